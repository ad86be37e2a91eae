#!/usr/bin/env bash
# The GPU check, prepared to run blind: one command, at most 8 minutes on one CUDA GPU, everything
# written under the folder given (nothing else is touched; no network needed).
#
#   scripts/device_check.sh OUT_DIR            # PYTHON=/path/to/python to pick the interpreter
#
# Steps (each under its own time limit, cut to what is left of the 8 minutes; a failing step is
# recorded and the next one runs):
#   env        nvidia-smi, torch / CUDA / timm versions                     -> env.json
#   tests      the CUDA-marked tests (pytest -m cuda)                       -> tests.xml
#   recompute  the recompute self-check on CUDA bf16, saved bytes vs floor  -> recompute.json
#   eager      benchmark, vit_base_patch16_224, batch 64, bf16 autocast     -> bench_eager.json
#   compiled   the same with torch.compile (Inductor)                      -> bench_compiled.json
#   demo       the demo fit on the GPU (configs/demo.yaml + configs/gpu.yaml) -> demo/
# then summary.json (every step's status and the key numbers) and a table on stdout.
# Each step's output is in OUT_DIR/<step>.log, its exit status in OUT_DIR/<step>.rc.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# One benchmark process on the GPU: the CPU threads only feed it.
export TOKENIZERS_PARALLELISM=false
TOTAL=${DEVICE_CHECK_SECONDS:-480}
start=$(date +%s)

log() { echo "[device_check $(date -u +%H:%M:%S)] $*" | tee -a "$out/device_check.log"; }

# step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left), record rc.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL - ($(date +%s) - start) - 15))  # 15 s kept for the summary
    if [ "$left" -lt 20 ]; then
        log "skip $name: out of time"
        echo "skipped" > "$out/$name.rc"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "start $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$rc" > "$out/$name.rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        log "end $name: TIMED OUT after ${limit}s (output so far in $name.log)"
    else
        log "end $name: rc=$rc"
    fi
}

if ! "$PY" -c "import torch, timm, wegeft_vision" > "$out/import.log" 2>&1; then
    log "cannot import torch, timm and wegeft_vision with $PY (see import.log); set PYTHON"
    exit 1
fi

step env 30 "$PY" - "$out/env.json" <<'EOF'
import json, platform, subprocess, sys
import timm, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                        timeout=20).stdout
except (OSError, subprocess.SubprocessError) as error:
    info["nvidia_smi"] = f"not run: {error}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}))
if not torch.cuda.is_available():
    sys.exit("CUDA is not available: the other steps will skip or fail")
EOF

step tests 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$out/tests.xml" \
    tests/test_fast_path.py tests/test_compile_export.py

step recompute 45 "$PY" - "$out/recompute.json" <<'EOF'
# The recompute self-check where it matters: CUDA, bf16 autocast, vit_base. Which recipes passed
# (per node type, device, dtype), and the saved activations with and without recompute.
import json, sys, warnings
import timm, torch
from wegeft_vision import WeGeFTConfig, apply_adapter
from wegeft_vision.adapters import WeGeFTLinear, kernels

def build(adapter):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    if adapter:
        apply_adapter(model, WeGeFTConfig(rank=16, targets="all"))
    else:
        model.requires_grad_(False).get_classifier().requires_grad_(True)
        model.patch_embed.register_forward_hook(lambda m, i, o: o.requires_grad_())
    return model.cuda().train()

images = torch.randn(8, 3, 224, 224, device="cuda")
result = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, adapter, recompute in (("floor", False, None), ("wegeft", True, True),
                                     ("wegeft-no-recompute", True, False)):
        model = build(adapter)
        for m in model.modules():
            if isinstance(m, WeGeFTLinear):
                m.recompute = recompute
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images).float().logsumexp(-1).mean()
        result[f"saved_mb_{name}"] = kernels.saved_activation_bytes(
            loss, list(model.parameters())) / 1e6
        loss.backward()
result["recipes"] = {f"{n} {d} {str(t).removeprefix('torch.')}": ok
                     for (n, d, t), ok in kernels._RECIPE_WORKS.items()}
result["warnings"] = [str(w.message) for w in caught if "recompute" in str(w.message)]
result["saved_x_floor"] = result["saved_mb_wegeft"] / result["saved_mb_floor"]
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
EOF

# Methods by registry name; those not registered in this tree are left out by benchmark.py.
methods=(floor wegeft wegeft-no-recompute lora dora vera)
step eager 90 "$PY" scripts/benchmark.py --device cuda --model vit_base_patch16_224 \
    --batch-size 64 --targets all --reps 10 --variants "${methods[@]}" \
    --json "$out/bench_eager.json"
step compiled 170 "$PY" scripts/benchmark.py --device cuda --model vit_base_patch16_224 \
    --batch-size 64 --targets all --reps 10 --variants floor wegeft lora dora vera --compile \
    --no-inference --json "$out/bench_compiled.json"

step demo 100 "$PY" -m wegeft_vision.cli fit --config configs/demo.yaml --config configs/gpu.yaml \
    --trainer.logger.init_args.save_dir "$out/demo" --trainer.default_root_dir "$out/demo"

"$PY" - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = ["env", "tests", "recompute", "eager", "compiled", "demo"]
summary = {"steps": {}}
for name in steps:
    rc = out / f"{name}.rc"
    summary["steps"][name] = rc.read_text().strip() if rc.exists() else "not run"
def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
for key, name in (("env", "env.json"), ("recompute", "recompute.json")):
    data = load(name)
    if data:
        summary[key] = {k: v for k, v in data.items() if k != "nvidia_smi"}
for key in ("eager", "compiled"):
    data = load(f"bench_{key}.json")
    if data:
        summary[key] = data["summary"]
xml = out / "tests.xml"
if xml.exists():
    import xml.etree.ElementTree as ET
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")}
demo = sorted(out.glob("demo/**/metrics.csv"))
if demo:
    import csv
    rows = list(csv.DictReader(demo[-1].open()))
    last = {k: v for row in rows for k, v in row.items() if v not in ("", None)}
    summary["demo"] = {k: last[k] for k in last if k.startswith(("test/", "val/acc", "epoch"))}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("step status (0 = ok):", summary["steps"])
for key in ("eager", "compiled"):
    for name, row in (summary.get(key) or {}).items():
        print(f"{key:9s} {name:22s} {row['step_wall_s'] * 1e3:8.1f} ms/step  "
              f"x floor {row['step_x_floor'] or float('nan'):.3f}  "
              f"x LoRA {row['step_x_lora'] or float('nan'):.3f}  peak {row['memory_mb']:.0f} MB")
print("tests:", summary.get("tests"), "| recompute:", {k: v for k, v in
      (summary.get("recompute") or {}).items() if k.startswith("saved")})
print("demo:", summary.get("demo"))
print(f"everything is under {out}; the numbers in summary.json")
EOF
log "done in $(( $(date +%s) - start )) s"
