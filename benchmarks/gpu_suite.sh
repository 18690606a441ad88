#!/usr/bin/env bash
# The GPU checks of issue 13 in one run, for a lent GPU machine with a short lease: the CUDA
# tests of the callback, then the benchmarks with `--device cuda --json`, most important first.
#
#   OUT=/some/folder DEADLINE=540 bash benchmarks/gpu_suite.sh [step ...]
#
# Run from the repository root. The machine's own PyTorch is used; packages it lacks (mnist1d,
# jsonargparse) are installed from wheels in .whl/ when that folder exists (no network there).
# Steps (default: the first list below): env cuda_tests suites projection cifar_resnet18 basis
# wide cifar_allcnn zoo; also split, retests, plain, profile, kernels, end_to_end (with the floor)
# and eigh_host (the per-class rule on the host's CPU against the GPU per layer size: what a size
# threshold for decomposing small layers on the host needs; docs/performance.md).
# Every step gets at most the time left before DEADLINE seconds (default 540); a step that would
# start with under 20 s left is skipped and listed. Results: $OUT/log.txt (everything printed) and
# $OUT/results.tar.gz (the JSON files and the pytest reports), rewritten after every step, so
# whatever finished comes back even if the run is cut off.
set -u
OUT=${OUT:-/tmp/gpu_suite}
DEADLINE=${DEADLINE:-540}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
START=$(date +%s)
ROOT=$(pwd)
LOG="$OUT/log.txt"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env cuda_tests suites projection cifar_resnet18 basis wide cifar_allcnn zoo)

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$ROOT:/tmp/site"
else
    export PYTHONPATH="$ROOT"
fi
export PYTHONUNBUFFERED=1

pack() { tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null; }

step() {  # step NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - ($(date +%s) - START)))
    local limit=$((cap < left - 5 ? cap : left - 5))
    if [ "$limit" -lt 20 ]; then
        echo "== $name: SKIPPED (only ${left}s left)" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit}s, at $(($(date +%s) - START))s)" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    pack
}

B="python3 benchmarks"
for s in "${STEPS[@]}"; do
    case $s in
    env)
        step env 30 bash -c 'nvidia-smi -L; python3 -c "import torch, lightning, torchmetrics, torchvision; print(torch.__version__, lightning.__version__, torchmetrics.__version__, torchvision.__version__, torch.cuda.get_device_name(0), torch.backends.cuda.matmul.fp32_precision)"' ;;
    cuda_tests)
        step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/lightning/test_cuda.py \
            tests/nullspace/test_gram_precision.py --junitxml="$RES/cuda_tests.xml" ;;
    suites)  # the callback's own tests, every fit on the GPU
        step suites 170 env UNSC_TEST_ACCELERATOR=gpu UNSC_ZOO_RESNET=1 python3 -m pytest -q \
            -p no:cacheprovider -n 8 tests/lightning/test_callback.py \
            tests/lightning/test_precision.py tests/lightning/test_projection_modes.py \
            tests/lightning/test_amortised_projection.py tests/lightning/test_zoo.py \
            tests/lightning/test_nothing_lost.py tests/lightning/test_resume.py \
            tests/lightning/test_paper_models.py tests/lightning/test_module.py \
            tests/lightning/test_sparse_gradients.py tests/lightning/test_recurrent.py \
            tests/lightning/test_unused_layers.py tests/lightning/test_eval_modes.py \
            --junitxml="$RES/suites_gpu.xml" ;;
    split)  # split TF32 products against IEEE float32, per layer shape (a rejected speed-up)
        step split 60 $B/bench_split_tf32.py --device cuda --repeats 5 \
            --json "$RES/split_tf32_cuda.json" ;;
    projection)
        step projection 110 $B/bench_projection.py --device cuda --repeats 5 --ranks 0.5 0.7 0.9 \
            --trained mnist1d_conv digits_conv resnet18 --json "$RES/projection_cuda.json" ;;
    basis)
        step basis_mnist1d 60 $B/bench_basis.py --device cuda --repeats 3 --models mnist1d \
            --samples 16000 --json "$RES/basis_mnist1d_cuda.json"
        step basis_allcnn 70 $B/bench_basis.py --device cuda --repeats 2 --models allcnn \
            --samples 4096 --json "$RES/basis_allcnn_cuda.json" ;;
    cifar_resnet18)
        step cifar_resnet18 100 $B/bench_cifar_projection.py --device cuda --setting resnet18 \
            --batch 512 --steps 6 --repeats 2 --json "$RES/cifar100_resnet18_projection_cuda.json" ;;
    cifar_allcnn)
        step cifar_allcnn 90 $B/bench_cifar_projection.py --device cuda --batch 512 \
            --retain-per-class 512 --steps 6 --repeats 2 --json "$RES/cifar_projection_cuda.json" ;;
    wide)
        step wide 70 $B/bench_wide_pass.py --device cuda --repeats 2 --samples 640 \
            --variants library sums --json "$RES/wide_build_cuda.json" ;;
    zoo)
        step zoo 80 $B/zoo.py --device cuda --seeds 0 --models resnet18 digits_conv vit \
            --json "$RES/zoo_cuda.json" ;;
    retests)  # after fixes: the CUDA tests and the suites that had failed, on the GPU
        step retests 90 env UNSC_TEST_ACCELERATOR=gpu python3 -m pytest -q -p no:cacheprovider \
            -n 4 tests/lightning/test_cuda.py tests/lightning/test_resume.py \
            tests/lightning/test_amortised_projection.py --junitxml="$RES/retests_gpu.xml" ;;
    plain)  # the shifted Gram (CPU-tuned) against one product per class block
        step plain 60 $B/bench_basis.py --device cuda --repeats 2 --models allcnn \
            --samples 4096 --variants auto plain --json "$RES/basis_allcnn_plain_cuda.json" ;;
    profile)
        step profile 80 $B/profile_build.py --device cuda --model allcnn --samples 4096 \
            --what build --out "$RES/profile_allcnn_cuda.txt" ;;
    kernels)  # per-class accumulation kernels (sorted slices vs one padded bmm, ...) on the GPU
        step kernels 90 $B/bench_per_class.py --device cuda --repeats 5 --section both \
            --json "$RES/per_class_kernels_cuda.json" ;;
    end_to_end)  # MNIST-1D UNSC against retraining, and UNSC against its floor, on the GPU
        step end_to_end 120 $B/bench_end_to_end.py --device cuda --repeats 2 \
            --json "$RES/bench_end_to_end_cuda.json"
        step floor 120 $B/bench_floor.py --device cuda --repeats 3 --json "$RES/bench_floor_cuda.json" ;;
    eigh_host)  # the per-class rule on the host's CPU against the GPU, per layer size
        step eigh_host 60 $B/bench_per_class.py --device cuda --section rule --repeats 3 \
            --rule-dims 5 27 96 128 320 432 864 1728 2304 --json "$RES/eigh_host_cuda.json" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
    esac
done
cp "$LOG" "$RES/log.txt"
pack
echo "== done in $(($(date +%s) - START))s; results in $OUT/results.tar.gz"
grep -E "^== |passed|failed|error" "$LOG" | tail -40
