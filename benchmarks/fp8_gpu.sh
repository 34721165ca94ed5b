#!/usr/bin/env bash
# The fp8 issue's GPU run, from the repo root on the lent H200, as ONE command per call:
#   PYTHONUNBUFFERED=1 bash benchmarks/fp8_gpu.sh 1    # env, kernel self-checks, 24 GB case, micro, forwards
#   PYTHONUNBUFFERED=1 bash benchmarks/fp8_gpu.sh 2    # env, bf16-kept-block sensitivity, 50-step latents, VAE
# Each call stays inside ~8.5 minutes (the script's own budget, then a hard timeout) and writes under $OUT:
# fp8_<call>.json (results; rewritten after every part), fp8_<call>.log (all output), nvidia_smi_<call>.txt.
# Merge the two afterwards:  python benchmarks/bench_fp8.py --merge fp8_1.json fp8_2.json --out benchmarks/results/fp8_h200.json
set -u
CALL=${1:-1}
OUT=${OUT:-/tmp/fp8_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
case "$CALL" in
  1) PARTS=env,selfcheck,mem24,micro,forward ;;
  2) PARTS=env,sensitivity,latents,vae ;;
  *) PARTS=$CALL ;;  # a comma list of parts
esac
nvidia-smi > "$OUT/nvidia_smi_$CALL.txt" 2>&1
timeout 515 python3 benchmarks/bench_fp8.py --parts "$PARTS" --budget-s "${BUDGET_S:-455}" \
  --out "$OUT/fp8_$CALL.json" > "$OUT/fp8_$CALL.log" 2>&1
rc=$?
tail -c 9000 "$OUT/fp8_$CALL.log"
echo "bench_fp8 exit code $rc"
exit $rc
