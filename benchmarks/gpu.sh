#!/usr/bin/env bash
# On the lent GPU machine, after the wheel kit of ../shared/gpu is installed (. /tmp/site.env):
#   bash benchmarks/gpu.sh agent      # issue 8: agent vs raw vLLM, TP=1, Qwen2.5-7B shape, dummy bf16
#   bash benchmarks/gpu.sh tp         # issue 11: TP=1 and TP=2 (needs 2 GPUs), same model
#   bash benchmarks/gpu.sh server     # issue 8: qwenrun's OpenAI server vs `vllm serve`, same model
#   bash benchmarks/gpu.sh multiturn  # issue 22: N sessions x 6 turns, 20 tools, qwenrun vs raw loop
#   bash benchmarks/gpu.sh startup    # issue 22: `qwenrun up` vs `vllm serve` to ready, cold and warm
#     (after `server`, whose starts are cold: PHASES=warm CACHE_ROOT=/tmp/vllm-caches for warm starts alone)
#   bash benchmarks/gpu.sh fourway    # issue 32: client loop on `vllm serve` / on qwenrun's pass-through /
#     qwenrun agent mode / in-process (benchmarks/four_way.py), one part per 10-minute call (DEADLINE_S),
#     RUNS="single:1,16,64,256x3 multi:1x3" GC_VARIANTS=freeze,nofreeze,threshold=10000:20:50 (part 1),
#     RUNS="multi:16x2 multi:64x3" (part 2), RUNS="multi:256x1" LAYOUT=one GPU_UTIL=0.85 (part 3); TAG names
#     the part's files; MAX_MODEL_LEN (16384: at 8192 the 6th turn's prompt, ~8.1 k tokens, plus its 128-token
#     answer did not always fit). LAYOUT=both: both servers on GPU 0 at once, GPU_UTIL each; one: one at a time.
# Writes logs and JSON under $OUT (or /tmp).
set -uo pipefail
OUT=${OUT:-/tmp}
M=/tmp/qwen7b-dummy
K=$(ls -d .gpu/c*/ 2>/dev/null | head -1)
[ -f $M/config.json ] || python3 ${K}make-qwen7b-dummy.py $M > $OUT/make-model.log 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
COMMON=(--model $M --dtype bfloat16 --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.85)
case "${1:-agent}" in
  agent)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/agent_vs_raw.py "${COMMON[@]}" --sessions 1,16,64,256 \
      --answer-tokens 128 --repeat ${REPEAT:-4} --tool ${TOOL:-async} --single-stream --json $OUT/agent_vs_raw_tp1.json 2>&1 | tee $OUT/agent_vs_raw_tp1.log | grep '\[bench\]' | grep -v RESULT ;;
  server)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/server_vs_vllm.py "${COMMON[@]}" --max-num-seqs 256 --no-enforce-eager \
      --requests ${REQUESTS:-512} --concurrency ${CONCURRENCY:-64} --max-tokens 128 --warmup 64 --time-limit 60 \
      --rounds ${ROUNDS:-1} --cache-root /tmp/vllm-caches --logs $OUT/server-logs --json $OUT/server_vs_vllm.json 2>&1 | tee $OUT/server_vs_vllm.log | grep '\[bench\]' ;;
  multiturn)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/multiturn.py --model $M --dtype bfloat16 --load-format dummy \
      --max-model-len 8192 --gpu-memory-utilization 0.85 --sessions ${SESSIONS:-1,16,64,256} --repeat ${REPEAT:-3} \
      --json $OUT/multiturn.json 2>&1 | tee $OUT/multiturn.log | grep '\[bench\]' | grep -v RESULT ;;
  startup)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/startup.py "${COMMON[@]}" --max-num-seqs 256 --no-enforce-eager \
      --rounds ${ROUNDS:-1} --phases ${PHASES:-cold,warm} --cache-root ${CACHE_ROOT:-/tmp/startup-caches} --logs /tmp/startup-logs --json $OUT/startup.json 2>&1 | tee $OUT/startup.log | grep '\[bench\]' | grep -v RESULT
    mkdir -p $OUT/startup-logs && cp /tmp/startup-logs/*.log $OUT/startup-logs/ ;;
  fourway)
    T=${TAG:-four_way} L=/tmp/${TAG:-four_way}-logs
    if [ -s /tmp/four_way.pids ]; then  # servers a killed call left behind hold GPU memory
      while read -r pg; do kill -9 -- "-$pg" 2>/dev/null; done < /tmp/four_way.pids; sleep 3
    fi
    CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 python3 benchmarks/four_way.py --model $M --dtype bfloat16 \
      --load-format dummy --max-model-len ${MAX_MODEL_LEN:-16384} --max-num-seqs 256 --no-enforce-eager \
      --gpu-memory-utilization ${GPU_UTIL:-0.44} --layout ${LAYOUT:-both} --runs "${RUNS:-single:1,16x3 multi:1,16x3}" \
      --warmup ${WARMUP:-8} --gc-variants "${GC_VARIANTS:-}" --gc-at ${GC_AT:-single:256} --gc-sides ${GC_SIDES:-c,d} \
      --gc-repeat ${GC_REPEAT:-2} --deadline-s ${DEADLINE_S:-530} ${FW_ARGS:-} --cache-root /tmp/vllm-caches \
      --pid-file /tmp/four_way.pids --logs $L --json $OUT/$T.json --table $OUT/$T.md 2>&1 \
      | grep -v '^RESULT ' | tee $OUT/$T.log | grep '\[bench\]' | grep -v warm-up
    tar czf $OUT/$T-logs.tgz -C /tmp $T-logs; cat $OUT/$T.md ;;
  tp)
    for tp in 2 1; do
      devs=$([ $tp = 2 ] && echo 0,1 || echo 0)
      CUDA_VISIBLE_DEVICES=$devs python3 benchmarks/agent_vs_raw.py "${COMMON[@]}" --tp $tp --sessions 64,256 \
        --answer-tokens 128 --repeat 4 --single-stream --json $OUT/tp$tp.json 2>&1 | tee $OUT/tp$tp.log | grep '\[bench\]'
    done ;;
esac
