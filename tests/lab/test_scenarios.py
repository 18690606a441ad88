"""Forgetting scenarios: class, multi-class, sub-class and random-sample forget specifications."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from torch.utils.data import TensorDataset

from unsc_lightning import ForgetSpec, UnlearningConfigError, UnlearningDataModule
from unsc_lightning.data.embedded import DIGIT_GROUPS, coarse_of, digits_bundle
from unsc_lightning.lab.bench import BenchConfig, forget_settings

MNIST1D_SMALL = {"num_samples": 1000}


SCENARIOS = {
    "class": ForgetSpec(kind="class", classes=[3]),
    "multiclass": ForgetSpec(kind="class", classes=[1, 3, 5, 7]),
    "subclass": ForgetSpec(kind="subclass", subclasses=[3]),
    "random": ForgetSpec(kind="random", fraction=0.1, seed=1),
}


def _datamodule(dataset: str, spec: ForgetSpec) -> UnlearningDataModule:
    options = MNIST1D_SMALL if dataset == "mnist1d" else {}
    dm = UnlearningDataModule.from_name(dataset, forget=spec, **options)
    dm.setup("fit")
    return dm


def _index_set(tensor: torch.Tensor) -> set[int]:
    values = tensor.tolist()
    assert len(values) == len(set(values)), "a split holds a sample twice"
    return set(values)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_splits_are_disjoint_and_complete(dataset: str, scenario: str) -> None:
    dm = _datamodule(dataset, SCENARIOS[scenario])
    splits = {name: _index_set(index) for name, index in dm.splits.items()}
    train_parts = [splits[n] for n in ("train_forget", "train_retain", "val_retain", "val_forget")]
    test_parts = [splits["test_retain"], splits["test_forget"]]
    for parts, size in ((train_parts, len(dm.bundle.train)), (test_parts, len(dm.bundle.test))):
        assert sum(len(p) for p in parts) == size  # disjoint (sizes add up) ...
        assert set().union(*parts) == set(range(size))  # ... and complete
    assert splits["train_forget"] and splits["train_retain"]


def test_class_specs_select_exactly_their_classes() -> None:
    for spec in (SCENARIOS["class"], SCENARIOS["multiclass"]):
        dm = _datamodule("digits", spec)
        train, test = dm._targets["train"], dm._targets["test"]
        forgotten = torch.tensor(spec.classes)
        val = torch.cat([dm.splits["val_retain"], dm.splits["val_forget"]])
        candidates = torch.ones_like(train, dtype=torch.bool)
        candidates[val] = False
        expected = torch.nonzero(candidates & torch.isin(train, forgotten)).flatten()
        assert torch.equal(dm.splits["train_forget"], expected)
        assert torch.equal(
            dm.splits["test_forget"], torch.nonzero(torch.isin(test, forgotten)).flatten()
        )
        assert dm.forget_classes == sorted(spec.classes)


def test_digit_groups_cover_every_digit_once() -> None:
    digits = sorted(d for group in DIGIT_GROUPS for d in group)
    assert digits == list(range(10))
    fine = torch.arange(10)
    coarse = coarse_of(fine)
    for index, group in enumerate(DIGIT_GROUPS):
        assert coarse[list(group)].tolist() == [index] * len(group)
    with pytest.raises(UnlearningConfigError, match="without a group"):
        coarse_of(torch.tensor([0, 12]), groups=((0,),))


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_subclass_spec_selects_exactly_one_fine_digit(dataset: str) -> None:
    spec = SCENARIOS["subclass"]
    dm = _datamodule(dataset, spec)
    fine_train, fine_test = dm.bundle.fine_targets
    coarse_train = dm._targets["train"]
    # the model learns the coarse groups; the fine digit's coarse class remains
    assert dm.num_classes == len(DIGIT_GROUPS)
    assert torch.equal(coarse_train, coarse_of(fine_train))
    assert dm.forget_classes == []
    val = torch.cat([dm.splits["val_retain"], dm.splits["val_forget"]])
    candidates = torch.ones_like(fine_train, dtype=torch.bool)
    candidates[val] = False
    expected = torch.nonzero(candidates & (fine_train == 3)).flatten()
    assert torch.equal(dm.splits["train_forget"], expected)
    assert set(dm.forget_targets().tolist()) == {3}  # digit 3 is in coarse group 3 = (3, 8)
    assert torch.equal(dm.splits["test_forget"], torch.nonzero(fine_test == 3).flatten())
    # the retain split still holds the other digit of the same coarse class
    retain_fine = fine_train[dm.splits["train_retain"]]
    assert (retain_fine == 8).any() and not (retain_fine == 3).any()
    # evaluation: held-out samples of the forgotten digit
    forget_loader = dm.test_dataloader()[1]
    assert len(forget_loader.dataset) == int((fine_test == 3).sum())


def test_random_spec_selects_exactly_its_fraction() -> None:
    spec = SCENARIOS["random"]
    dm = _datamodule("digits", spec)
    val = torch.cat([dm.splits["val_retain"], dm.splits["val_forget"]])
    candidates = sorted(set(range(len(dm.bundle.train))) - set(val.tolist()))
    forget = dm.splits["train_forget"]
    assert forget.numel() == round(0.1 * len(candidates))
    assert set(forget.tolist()) <= set(candidates)
    # seeded: the same seed selects the same samples, another seed others
    assert torch.equal(
        forget,
        _datamodule("digits", ForgetSpec(kind="random", fraction=0.1, seed=1)).splits[
            "train_forget"
        ],
    )
    other = _datamodule("digits", ForgetSpec(kind="random", fraction=0.1, seed=2)).splits[
        "train_forget"
    ]
    assert not torch.equal(forget, other)
    # the classes remain: nothing held out is "forgotten", the forget evaluation is the samples themselves
    assert dm.forget_classes == [] and dm.splits["test_forget"].numel() == 0
    assert len(set(dm.forget_targets().tolist())) > 1
    assert len(dm.test_dataloader()[1].dataset) == forget.numel()


def test_spec_is_plain_data() -> None:
    for spec in SCENARIOS.values():
        payload = json.loads(json.dumps(asdict(spec)))  # what a YAML / JSON config holds
        assert ForgetSpec(**payload) == spec
    yaml_like = {"kind": "subclass", "subclasses": [3]}
    assert ForgetSpec(**yaml_like).forgotten_classes == []


def test_spec_is_configurable_through_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--forget", type=ForgetSpec)
    config = parser.parse_args(["--forget", '{"kind": "subclass", "subclasses": [3]}'])
    spec = parser.instantiate_classes(config).forget
    assert spec == ForgetSpec(kind="subclass", subclasses=[3])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (dict(kind="everything"), "`kind`.*'everything'"),
        (dict(kind="subclass"), r"`subclasses`.*\[\]"),
        (dict(kind="subclass", subclasses=[3, 3]), "`subclasses` without duplicates"),
        (dict(kind="subclass", subclasses=[12]), r"`subclasses` in \[0, 9\].*\[12\]"),
        (dict(kind="random", fraction=1.5), "`fraction` in \\(0, 1\\).*1.5"),
        (dict(kind="class", classes=[10]), "`forget_classes`"),
    ],
)
def test_invalid_specs(spec: dict, match: str) -> None:
    # a wrong `kind` is refused when the spec is built, the rest when the data are known
    with pytest.raises(UnlearningConfigError, match=match):
        dm = UnlearningDataModule.from_name(
            "digits", forget=ForgetSpec(**spec), coarse_labels=spec["kind"] == "subclass"
        )
        dm.setup("fit")


def test_subclass_needs_fine_labels() -> None:
    bundle = digits_bundle()
    dm = UnlearningDataModule(
        train_dataset=bundle.train,
        test_dataset=bundle.test,
        forget=ForgetSpec(kind="subclass", subclasses=[3]),
    )
    with pytest.raises(UnlearningConfigError, match="fine_targets"):
        dm.setup("fit")
    # asking the embedded module for digit labels with a sub-class spec is the same mistake
    with pytest.raises(UnlearningConfigError, match="fine_targets"):
        UnlearningDataModule.from_name(
            "digits", forget=ForgetSpec(kind="subclass", subclasses=[3]), coarse_labels=False
        ).setup()


def test_custom_coarse_dataset() -> None:
    fine = torch.arange(40) % 4
    coarse = fine // 2
    x = torch.randn(40, 3)
    bundle_train = TensorDataset(x, coarse)
    dm = UnlearningDataModule(
        train_dataset=bundle_train,
        test_dataset=bundle_train,
        forget=ForgetSpec(kind="subclass", subclasses=[1]),
        val_fraction=0.0,
    )
    dm._bundle = dm.build_datasets()
    dm._bundle.fine_targets = (fine, fine)
    dm.setup()
    assert torch.equal(dm.splits["train_forget"], torch.nonzero(fine == 1).flatten())


@pytest.mark.parametrize(
    ("scenario", "classes", "expected"),
    [
        ("class", None, [ForgetSpec(kind="class", classes=[3])]),
        ("class", [5], [ForgetSpec(kind="class", classes=[5])]),
        ("multiclass", [1, 3], [ForgetSpec(kind="class", classes=[1, 3])]),
        (
            "multiclass",
            None,
            [
                ForgetSpec(kind="class", classes=c)
                for c in ([1, 3], [1, 3, 5], [1, 3, 5, 7], [1, 2, 3, 5, 7])
            ],
        ),
        ("subclass", None, [ForgetSpec(kind="subclass", subclasses=[3])]),
        ("random", None, [ForgetSpec(kind="random", fraction=0.1, seed=7)]),
    ],
)
def test_bench_scenarios(
    scenario: str, classes: list[int] | None, expected: list[ForgetSpec]
) -> None:
    settings = forget_settings(BenchConfig(scenario=scenario, forget_classes=classes))
    assert [spec_of(7) for spec_of in settings] == expected


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            BenchConfig(scenario="class", forget_classes=[1, 3]),
            "`--scenario class` forgets one class",
        ),
        (BenchConfig(scenario="multiclass", forget_classes=[1, 2, 3, 4, 5, 6]), "2 to 5 classes"),
        (BenchConfig(scenario="multiclass", sizes=[7]), r"`--sizes`.*\[7\]"),
        (BenchConfig(scenario="random", fraction=0.0), "`--fraction`"),
        (BenchConfig(scenario="all"), "`--scenario`"),
    ],
)
def test_bench_scenario_errors(config: BenchConfig, match: str) -> None:
    with pytest.raises(UnlearningConfigError, match=match):
        forget_settings(config)
