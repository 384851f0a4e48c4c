#!/usr/bin/env bash
# The GPU check in one command of at most 8 minutes (every phase under its own `timeout`; the
# limits add up to 475 s, 430 s where jax already has its GPU backend), from anywhere:
#
#     bash benchmarks/device_check.sh
#
# install (45 s; backend check 20 s; + 45 s only if jax has no GPU backend) -> GPU pytest subset
# (100 s) -> attention (30 s) -> step time + MFU, LoRA and QLoRA (130 s) -> memory vs rank (90 s)
# -> report (15 s).
# Install: `pip install -e ".[test]"`, then `pip install -U "jax[cuda12]"` if jax's backend is not gpu;
# where no package index can be reached (the lent machines reach nothing), each fails fast and is
# reported, and the run goes on with the interpreter's own packages and the repository on PYTHONPATH.
# Wheels of missing pure-Python packages (e.g. ml_collections, which `jaxlora.config` imports) can be
# carried in .whl/ (made here, e.g. `python3 -m pip download --no-deps -d .whl ml_collections`); they are
# installed offline into /tmp/site. Results: $OUT (else benchmarks/results): device_check.log (this
# output), device_check.json, device_check.md. PYTHON picks the interpreter (default python3);
# DEVICE_CHECK_ARGS is added to every device_check.py call (e.g. --smoke, to try this script on a CPU).
set -u
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"

phase() {  # phase NAME LIMIT_S COMMAND...: run it under `timeout`, print its exit code and seconds
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  start=$(date +%s)
  timeout -k 5 "$limit" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s"
  echo "=== $name: exit code $rc, $(($(date +%s) - start)) s"
  return $rc
}

{
  PY=${PYTHON:-python3}
  PIP="$PY -m pip --disable-pip-version-check"
  read -r -a EXTRA <<<"${DEVICE_CHECK_ARGS:-}"
  export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "device check $(date -u +%FT%TZ) in $PWD, $($PY --version 2>&1) at $(command -v "$PY")"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

  install="-e .[test]: "
  if phase "pip install -e .[test]" 45 $PIP install -q --retries 0 --timeout 10 -e ".[test]"; then
    install+="installed"
  else
    install+="FAILED (no package index?)"
  fi
  if phase "jax backend" 20 $PY -c "import jax; assert jax.default_backend() == 'gpu', jax.default_backend()"; then
    install+="; jax already has a GPU backend"
  elif phase "pip install jax[cuda12]" 45 $PIP install -q --retries 0 --timeout 10 -U "jax[cuda12]"; then
    install+="; jax[cuda12] installed"
  else
    install+="; jax[cuda12] FAILED"
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    if $PIP install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
      export PYTHONPATH="$PYTHONPATH:/tmp/site"
      install+="; carried wheels installed ($(ls .whl | tr '\n' ' '))"
    else
      install+="; carried wheels FAILED"
    fi
  fi
  $PY - <<'EOF'
import importlib
found = []
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "safetensors", "sentencepiece",
             "tokenizers", "numpy", "pytest", "jaxlora"):
    try:
        module = importlib.import_module(name)
        found.append(f"{name} {getattr(module, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        found.append(f"{name} MISSING ({type(e).__name__})")
print("packages: " + ", ".join(found))
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as e:  # noqa: BLE001
    print("jax devices: FAILED", e)
EOF
  echo "install: $install"

  phase "pytest (GPU subset)" 100 $PY -m pytest -x -q -p no:cacheprovider tests/test_step.py tests/test_qlora.py \
    tests/test_sequence_packing.py tests/test_attention_impl.py
  pytest_rc=$?
  phase attention 30 $PY benchmarks/device_check.py "${EXTRA[@]}" --phase attention --out "$OUTDIR"
  phase "step time + MFU" 130 $PY benchmarks/device_check.py "${EXTRA[@]}" --phase step --child-timeout 60 \
    --out "$OUTDIR"
  phase "memory vs rank" 90 $PY benchmarks/device_check.py "${EXTRA[@]}" --phase memory --child-timeout 80 \
    --out "$OUTDIR"
  phase report 15 $PY benchmarks/device_check.py "${EXTRA[@]}" --phase report --pytest-rc "$pytest_rc" \
    --install "$install" --out "$OUTDIR"
} 2>&1 | tee "$OUTDIR/device_check.log"
