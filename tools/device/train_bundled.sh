#!/usr/bin/env bash
# On the device, one call: train the bundled model on every GPU of the machine (torchrun + DDP),
# compiled blocks (trainer.compile) and a schedule fitted to the call's time (trainer.fit_max_steps).
# If the compiled run fails early, the rest of the call trains eagerly. Optional first: a short
# one-GPU eager probe (PROBE=1) for the single-card speed. The fp16 export comes back in 15 MB parts:
#   cat model.pt.part-* > asr/pretrained/model.pt
# Env: CALL_BUDGET (s, default 570), BATCH (padded audio-seconds per GPU and step, default 400),
#      COMPILE (1/0, default 1), PROBE (0/1, default 0).
set -uo pipefail
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-570}; BATCH=${BATCH:-400}; COMPILE=${COMPILE:-1}; PROBE=${PROBE:-0}
python -m pip install --no-deps --no-index -q .gpu/wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc FLA_CACHE_RESULTS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/tc && tar xzf tools/device/fla_autotune_sm90.tgz -C /tmp/tc
NGPU=$(nvidia-smi -L | wc -l)
WORKERS=$(( $(nproc) / NGPU - 2 ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
echo "gpus=$NGPU workers/gpu=$WORKERS batch=${BATCH}s/gpu compile=$COMPILE"
COMMON="recipe=bundled model=bundled trainer.tensorboard=false trainer.progress_bar=false data.num_workers=$WORKERS data.max_batch_seconds=$BATCH"
if [ "$PROBE" = 1 ]; then
  timeout 100 python -m asr.cli.train $COMMON trainer.max_steps=250 trainer.log_every=50 trainer.val_every=100000 trainer.save_every=100000 hydra.run.dir=/tmp/probe > $OUT/probe.log 2>&1
  echo "probe (1 GPU) rc=$? after $(( $(date +%s) - T0 )) s"; grep "audio-s/s" $OUT/probe.log | tail -3
fi
train() {  # train <compile 0/1> <log>
  local left=$(( CALL_BUDGET - ($(date +%s) - T0) - 40 ))
  local compile=$([ "$1" = 1 ] && echo true || echo false)
  echo "training ${left}s, compile=$compile"
  torchrun --standalone --nproc_per_node $NGPU -m asr.cli.train $COMMON trainer.compile=$compile \
    trainer.max_steps=100000 trainer.fit_max_steps=true trainer.max_minutes=$(python -c "print($left/60)") \
    trainer.val_every=1000 trainer.log_every=100 hydra.run.dir=/tmp/run > "$2" 2>&1
}
train $COMPILE $OUT/train_stdout.log; rc=$?
echo "train ($NGPU GPUs) rc=$rc after $(( $(date +%s) - T0 )) s"
if [ $rc != 0 ] && [ $(( $(date +%s) - T0 )) -lt 300 ]; then
  tail -30 $OUT/train_stdout.log; rm -rf /tmp/run
  train 0 $OUT/train_eager.log; echo "eager retry rc=$? after $(( $(date +%s) - T0 )) s"
  cat $OUT/train_eager.log >> $OUT/train_stdout.log
fi
grep -E "audio-s/s|WER|max_steps|stopping" $OUT/train_stdout.log | tail -14 | cut -c1-200
cp /tmp/run/metrics.jsonl /tmp/run/summary.json $OUT/
python tools/export_model.py /tmp/run /tmp/model.pt && split -b 15M /tmp/model.pt $OUT/model.pt.part-
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
