#!/usr/bin/env bash
# Everything attncc checks and times on the GPU machine, in one call. Logs under $OUT.
#   bench/run_gpu.sh tests|soundness|compat|flash|linear|tune_linear|profile_linear|softplus_attnres|softplus|tune_softplus|model|model_train|model_attnres|model_linear|model_softplus|model_mask|decode|profile_decode|all
# attncc is installed as a wheel (the package-dir mapping needs an install) and run from outside the
# checkout, so that the checkout's attncc/ folder does not shadow the installed package.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/out}; mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation --force-reinstall "$REPO" >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
cd /tmp
python -c "import attncc, attncc.codegen.variants.softmax.ops; print(\"attncc from\", attncc.__file__)" || { tail -20 "$OUT/install.log"; exit 1; }
what=${1:-all}
status=0
if [ "$what" = soundness ]; then  # the GPU tests, then the soundness tables under this machine's torch
    python -m pytest -q -m gpu "$REPO/tests" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 || status=1
    python -m pytest -q "$REPO/tests/test_soundness.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_soundness_passes.py" "$REPO/tests/test_validation.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_soundness.log" | tail -8 || status=1
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
    python -m pytest -q -m gpu "$REPO/tests" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 || status=1
    python -m pytest -q "$REPO/tests/test_ops.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_ops.log" | tail -5 || status=1
fi
if [ "$what" = compat ]; then  # the CPU suite's model tests under this machine's torch and transformers
    python -m pytest -q -x "$REPO/tests/test_ops.py" "$REPO/tests/test_families.py" "$REPO/tests/test_models.py" "$REPO/tests/test_sqa.py" "$REPO/tests/test_variants_e2e.py" "$REPO/tests/test_spellings.py" "$REPO/tests/test_soundness.py" "$REPO/tests/test_sdpa_arguments.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_compat.log" | tail -8 || status=1
fi
if [ "$what" = flash ] || [ "$what" = all ]; then
    python "$REPO/bench/bench_flash.py" --sizes 2048 8192 32768 2>&1 | tee "$OUT/bench_flash.log" | tail -14
fi
if [ "$what" = linear ]; then  # the linear/MALA kernels: GPU tests, then against fla (wheels carried in .whl/)
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl >>"$OUT/install.log" 2>&1
        export PYTHONPATH=/tmp/site
    fi
    python -m pytest -q -m gpu "$REPO/tests/test_linear_kernel.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_linear.log" | tail -8 || status=1
    python "$REPO/bench/bench_linear.py" --sizes ${SIZES:-2048 8192 32768} 2>&1 | tee "$OUT/bench_linear.log" | tail -16
fi
if [ "$what" = tune_linear ]; then  # the linear kernels' launch parameters swept per kind (KINDS; fla from .whl/)
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl >>"$OUT/install.log" 2>&1
        export PYTHONPATH=/tmp/site
    fi
    for kind in ${KINDS:-identity_raw elu1_norm}; do
        (cd "$REPO/bench" && timeout ${TUNE_TIMEOUT:-200} python tune_linear.py --n ${SIZES:-32768} --kind $kind) 2>&1 | tee "$OUT/tune_linear_$kind.log" | tail -8
    done
fi
if [ "$what" = profile_linear ]; then  # the linear kernels and fla's, kernel by kernel (fla from .whl/)
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl >>"$OUT/install.log" 2>&1
        export PYTHONPATH=/tmp/site
    fi
    (cd "$REPO/bench" && python profile_linear.py ${PROFILE_ARGS:-}) 2>&1 | tee "$OUT/profile_linear.log" | tail -60
fi
if [ "$what" = softplus_attnres ]; then  # the softplus and AttnRes kernels (fla's fused_attnres from .whl/)
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl >>"$OUT/install.log" 2>&1
        export PYTHONPATH=/tmp/site
    fi
    python "$REPO/bench/bench_softplus_attnres.py" --sizes ${SIZES:-8192 32768} 2>&1 | tee "$OUT/bench_softplus_attnres.log" | tail -16
fi
if [ "$what" = softplus ]; then  # the softplus kernels only: GPU tests, kernel bench (no AttnRes), the model at 32768
    python -m pytest -q -m gpu "$REPO/tests/test_softplus_kernel.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_softplus.log" | tail -6 || status=1
    (cd "$REPO/bench" && python bench_softplus_attnres.py --skip attnres --sizes ${SIZES:-32768 8192}) 2>&1 | tee "$OUT/bench_softplus.log" | tail -12
    python "$REPO/bench/bench_model.py" --policy softplus --sizes 32768 2>&1 | tee "$OUT/bench_model_softplus.log" | tail -6
fi
if [ "$what" = tune_softplus ]; then  # the softplus kernels: GPU tests, then the tiles swept at one size
    python -m pytest -q -m gpu "$REPO/tests/test_softplus_kernel.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_softplus.log" | tail -6 || status=1
    python "$REPO/bench/tune_softplus.py" --n ${SIZES:-32768} 2>&1 | tee "$OUT/tune_softplus.log" | tail -20
fi
if [ "$what" = model_softplus ]; then
    python "$REPO/bench/bench_model.py" --policy softplus --sizes ${SIZES:-8192 32768} 2>&1 | tee "$OUT/bench_model_softplus.log" | tail -12
fi
if [ "$what" = model_linear ]; then
    python "$REPO/bench/bench_model.py" --policy linear --sizes 8192 32768 2>&1 | tee "$OUT/bench_model_linear.log" | tail -12
fi
if [ "$what" = model_train ]; then  # a training step at 8192 (issue 13: softmax >= 1.4x eager; first-call compile)
    python "$REPO/bench/bench_model.py" --train --sizes ${SIZES:-8192} 2>&1 | tee "$OUT/bench_model_train.log" | tail -8
fi
if [ "$what" = model_attnres ]; then  # Block AttnRes (blocks of 8) on top of softmax: its prefill cost (issue 12: <= 5%)
    python "$REPO/bench/bench_model.py" --residual 8 --sizes ${SIZES:-32768} 2>&1 | tee "$OUT/bench_model_attnres.log" | tail -8
fi
if [ "$what" = model_mask ]; then
    python "$REPO/bench/bench_model.py" --sizes 8192 32768 --mask 2>&1 | tee "$OUT/bench_model_mask.log" | tail -12
fi
if [ "$what" = profile_decode ]; then  # where a decode step's time goes (bench/profile_decode.py)
    (cd "$REPO/bench" && python profile_decode.py ${PROFILE_ARGS:-}) 2>&1 | tee "$OUT/profile_decode.log" | tail -8
fi
if [ "$what" = decode ]; then  # generation after a long prompt: the generate GPU tests, then tokens/s
    python -m pytest -q -m gpu "$REPO/tests/test_generate.py" -p no:cacheprovider 2>&1 | tee "$OUT/pytest_generate.log" | tail -8 || status=1
    python "$REPO/bench/bench_decode.py" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/bench_decode.log" | tail -14
fi
if [ "$what" = model ] || [ "$what" = all ]; then
    python "$REPO/bench/bench_model.py" --sizes 8192 32768 2>&1 | tee "$OUT/bench_model.log" | tail -12
fi
exit $status
