#!/usr/bin/env bash
# The one prepared GPU check (issue 16): every CUDA path of the project once, in stages, most important first.
#
#   bash scripts/gpu_check.sh               # on the GPU machine: under 5 minutes of work (GPU_CHECK_BUDGET_S, 290)
#   bash scripts/gpu_check.sh --cpu-smoke   # the same stages on CPU with tiny shapes, in well under a minute
#
# The device invocation (the device tool; 15 minutes of device time in all, so one run of at most 400 s leaves room
# for a retry): first, here, `bash scripts/gpu_wheels.sh` (fills .whl/), then
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=400)
# and give the machine back unless rerunning at once. The 8 files come back under the reply's files_at.
#
# Stages (each under its own `timeout`, their limits summing to less than the budget; a stage is skipped when the
# budget is spent or what it builds on left no checkpoint; each writes its JSON into $OUT as it finishes,
# scripts/gpu_check.py stamps it). Worst case: the budget, plus one stage's kill grace (35 s), plus the wheels' install
# and the package report before the clock starts: under the 400 s above.
#   01_bench_bf16_compiled.json  bench.py, gpt2 preset, bf16, torch.compile: tokens/s, MFU against the vendor's
#                                989 TFLOP/s and the device's measured matmul peak (8192^3 bf16), profiler top kernels
#   02_bench_eager.json          bench.py, gpt2 preset, eager bf16 and fp16 (fp16 with the GradScaler)
#   03_pretrain.json             torchrun --nproc_per_node=1 train.py --config configs/gpt2.toml, 30 steps, on a corpus
#                                made here from the Python standard library (no download); a checkpoint every 10
#                                steps, and on timeout's SIGTERM (35 s to write it before the SIGKILL: torchrun
#                                gives its worker 30 s after forwarding the SIGTERM, then kills it itself)
#   04_sft.json, 05_dpo.json     a few SFT steps on that run's newest checkpoint (even one of a run that timed out),
#                                then a few DPO steps on the SFT run (built-in tasks)
#   06_evaluate.json             evaluate.py on the DPO run: text bits per byte, chat accuracy, preferences
#   gpu_check.json               every stage's status and seconds, and the headline figures; gpu_check.log: all output
# That is 8 files, what the device tool brings back. Batch: the gpt2 preset's 16 x 1024 tokens per micro-step in
# bench.py; configs/gpt2.toml's 16 x 1024 x grad_accum 4 in the training run. FLOPs: 6N + 12 L d T per token.
#
# Python packages the device image lacks (`datasets`, and the `dill` and `multiprocess` it needs) travel as wheels
# in .whl/ (scripts/gpu_wheels.sh downloads them here; the device tool's `carry` names .whl): installed first.
# Environment: OUT (default ./gpu_check_out), PYTHON (default python3), GPU_CHECK_BUDGET_S.
set -u
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --cpu-smoke) MODE=cpu-smoke ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-smoke]  (unknown argument '$1')" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPTRAIN_CACHE=$WORK/cache
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

if [[ $MODE == gpu ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-290}
  DEVICE=cuda
  BENCH=(--preset gpt2 --device cuda --no-loop --no-data --steps 20 --warmup 3 --profile 3)
  COMPILED=(--no-eager)  # stage 1: compiled only
  MODEL=()
  CORPUS_MB=6
  # the preset's padded vocabulary even if the 6 MB corpus gives the tokenizer fewer merges: the same shapes as the
  # bench's, so the compiled run can reuse its compile (inductor's cache is keyed by shapes and strides)
  PRETRAIN=(--train.max_steps=30 --train.warmup_steps=10 --log.interval=5 --eval.interval=15 --ckpt.interval=10
            --model.vocab_size=50304)
  FINETUNE=(--data.synthetic_train=512 --data.synthetic_val=32 --train.max_steps=8 --train.warmup_steps=2)
  EVAL=(--max-tokens 65536 --max-examples 32)
  # seconds per stage: 275 in all, 15 under the budget (the stamps, the summary); the compiled bench (torch.compile of
  # the gpt2 preset, a minute cold) and the compiled pre-training run take the most (a pre-training run that times
  # out still leaves its checkpoints to SFT); SFT and DPO run eager, each loading and writing a 1.5 GB checkpoint
  # (weights and AdamW state) around its 8 steps and its final validation
  T_BENCH=100 T_EAGER=35 T_PRETRAIN=75 T_SFT=25 T_DPO=25 T_EVAL=15
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "gpu_check: installing .whl/ failed"
  fi
else
  BUDGET=${GPU_CHECK_BUDGET_S:-150}
  DEVICE=cpu
  # tiny shapes; no torch.compile (minutes on a small CPU): stage 1 measures the eager bf16 step instead
  BENCH=(--preset gpt2 --device cpu --no-loop --no-data --steps 2 --warmup 1 --profile 1 --batch-size 2
         --peak-n 128 --peak-seconds 0.05 --model n_layer=1 n_embd=32 n_head=2 block_size=32 vocab_size=320)
  COMPILED=(--no-compile)
  MODEL=(--model.n_layer=1 --model.n_embd=32 --model.n_head=2 --model.block_size=32 --model.vocab_size=320
         --train.batch_size=2 --train.grad_accum=1 --train.compile=false --data.num_proc=1)
  CORPUS_MB=0.05
  # a fixed peak for MFU: measuring the CPU's (2048^3 matmuls) would cost each run seconds
  PRETRAIN=(--train.max_steps=3 --train.warmup_steps=1 --log.interval=1 --eval.interval=2 --eval.max_tokens=1024
            --eval.sample_tokens=8 --train.peak_flops=1e11 --ckpt.interval=2)
  FINETUNE=(--data.synthetic_train=64 --data.synthetic_val=8 --train.max_steps=2 --train.warmup_steps=1
            --train.batch_size=2 --eval.sample_tokens=8 --train.peak_flops=1e11)
  EVAL=(--max-tokens 1024 --max-examples 8)
  T_BENCH=20 T_EAGER=20 T_PRETRAIN=45 T_SFT=20 T_DPO=20 T_EVAL=20  # 145 of the 150 s (a loaded 2-core CPU)
fi

echo "gpu_check: mode $MODE, budget ${BUDGET}s, out $OUT, work $WORK, $("$PY" --version 2>&1)"
[[ $MODE == gpu ]] && { nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda',
  torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; }
# what `datasets` stands on, and whether it imports: the training stages need it, the benches do not
"$PY" -m pip show pyarrow fsspec huggingface_hub pandas datasets 2>&1 | grep -E "^(Name|Version|WARNING)" | paste -sd' '
if "$PY" -c "import datasets; print('gpu_check: import datasets: ok', datasets.__version__)"; then :; else
  echo "gpu_check: import datasets: FAILED (the benches do not need it; the training stages will fail)"
fi
START=$SECONDS  # the budget is the stages' own: the report above (torch and datasets imports) comes before it

# stage NAME LIMIT_S CMD...: run CMD under timeout(1), at most LIMIT_S and never past the budget; sets RC and SECS
# (RC -1: skipped, no time left). KILL_S (default 5): seconds between timeout's SIGTERM and its SIGKILL.
stage() {
  local name=$1 limit=$2 left grace=${KILL_S:-5}
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  LIMIT=$limit
  if ((limit < 5)); then
    echo "=== $name: skipped (budget spent)"; RC=-1; SECS=0; return
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k "$grace" "$limit" "$@"
  RC=$?
  SECS=$((SECONDS - t0))
  echo "=== $name: rc $RC after ${SECS}s"
}
skip() { RC=-1; SECS=0; LIMIT=0; echo "=== $1: skipped ($2)"; }
stamp() { "$PY" scripts/gpu_check.py stamp "$OUT/$2" --stage "$1" --rc "$RC" --seconds "$SECS" --timeout "$LIMIT"; }
# checkpoint_of RUN: prints the run's newest checkpoint and succeeds, or fails when it saved none
checkpoint_of() { "$PY" scripts/gpu_check.py checkpoint "$WORK/$1"; }
record_run() {
  "$PY" scripts/gpu_check.py run "$WORK/$1" "$OUT/$2" --stage "$1" --rc "$RC" --seconds "$SECS" --timeout "$LIMIT"
}

F1=01_bench_bf16_compiled.json
stage bench_bf16_compiled "$T_BENCH" "$PY" scripts/bench.py "${BENCH[@]}" "${COMPILED[@]}" --precision bf16 \
  --json "$OUT/$F1"
stamp bench_bf16_compiled $F1

F2=02_bench_eager.json
stage bench_eager_bf16_fp16 "$T_EAGER" "$PY" scripts/bench.py "${BENCH[@]}" --no-compile --precision bf16 fp16 \
  --json "$OUT/$F2"
stamp bench_eager_bf16_fp16 $F2

CORPUS=$WORK/corpus
# 35 s after the SIGTERM: train.py saves a checkpoint at the end of the step it is in (the gpt2 preset's 1.5 GB).
# torchrun runs its worker in a session of its own, out of timeout's reach: on the SIGTERM it forwards the signal and
# waits up to 30 s before killing the worker itself, so a SIGKILL sooner would orphan a worker still holding the GPU
KILL_S=35 stage pretrain "$T_PRETRAIN" bash -c '"$0" scripts/gpu_check.py corpus "$1" --max-mb "$2" && shift 2 &&
  exec "$0" -m torch.distributed.run --standalone --nproc_per_node=1 train.py "$@"' "$PY" "$CORPUS" "$CORPUS_MB" \
  --config configs/gpt2.toml --data "$CORPUS" --out "$WORK/pretrain" --train.time_budget_min=0 \
  --train.device=$DEVICE "${PRETRAIN[@]}" "${MODEL[@]}"
record_run pretrain 03_pretrain.json

# finetune STAGE FROM LIMIT FILE WHO: a few steps of STAGE on the run FROM. Each later stage needs only a checkpoint
# of the one before it: a run stopped by its timeout still saved one (WHO names FROM in the skip reason).
finetune() {
  if checkpoint_of "$2"; then
    stage "$1" "$3" "$PY" train.py --stage "$1" --init-from "$WORK/$2" --out "$WORK/$1" \
      --train.time_budget_min=0 --train.device=$DEVICE --log.interval=1 --eval.interval=0 "${FINETUNE[@]}"
  else
    skip "$1" "$5 saved no checkpoint"
  fi
  record_run "$1" "$4"
}
finetune sft pretrain "$T_SFT" 04_sft.json pre-training
finetune dpo sft "$T_DPO" 05_dpo.json SFT

F6=06_evaluate.json
if checkpoint_of dpo; then  # text of the corpus, chat and preferences (against the SFT run, DPO's reference)
  stage evaluate "$T_EVAL" "$PY" scripts/evaluate.py "$WORK/dpo" --data "$CORPUS" --split val --chat-data synthetic \
    --preference-data synthetic "${EVAL[@]}" --json "$OUT/$F6"
elif checkpoint_of pretrain; then  # at least the pre-trained model's bits per byte
  stage evaluate "$T_EVAL" "$PY" scripts/evaluate.py "$WORK/pretrain" "${EVAL[@]}" --json "$OUT/$F6"
else
  skip evaluate "no run saved a checkpoint"
fi
stamp evaluate $F6

"$PY" scripts/gpu_check.py summary "$OUT" --mode $MODE --seconds $((SECONDS - START))
SUMMARY_RC=$?
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID"  # the log complete before the files are collected
exit $SUMMARY_RC
