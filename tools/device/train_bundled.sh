#!/usr/bin/env bash
# On the device, one call: train the bundled model on every GPU of the machine (torchrun + DDP),
# after a short one-GPU probe that gives the single-card speed (issue 3's speed-up) and sizes
# max_steps so the cosine schedule ends inside the call. The fp16 export comes back in 15 MB parts:
#   cat model.pt.part-* > asr/pretrained/model.pt
# Env: CALL_BUDGET (s, default 580), BATCH (padded audio-seconds per GPU and step, default 400).
set -uo pipefail
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-580}
BATCH=${BATCH:-400}
python -m pip install --no-deps --no-index -q .gpu/wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc FLA_CACHE_RESULTS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/tc && tar xzf tools/device/fla_autotune_sm90.tgz -C /tmp/tc
NGPU=$(nvidia-smi -L | wc -l)
WORKERS=$(( $(nproc) / NGPU - 2 ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
echo "gpus=$NGPU workers/gpu=$WORKERS batch=${BATCH}s/gpu"
COMMON="recipe=bundled model=bundled trainer.tensorboard=false trainer.progress_bar=false data.num_workers=$WORKERS data.max_batch_seconds=$BATCH"
timeout 100 python -m asr.cli.train $COMMON trainer.max_steps=250 trainer.log_every=50 trainer.val_every=100000 trainer.save_every=100000 hydra.run.dir=/tmp/probe > $OUT/probe.log 2>&1
echo "probe (1 GPU) rc=$? after $(( $(date +%s) - T0 )) s"; grep "audio-s/s" $OUT/probe.log | tail -3
left=$(( CALL_BUDGET - ($(date +%s) - T0) - 60 ))
steps=$(python -c "
import json; recs=[json.loads(l) for l in open('/tmp/probe/metrics.jsonl') if 'train/steps_per_sec' in l]
rate=recs[-1]['train/steps_per_sec']; print(int(rate*($left-45)*0.85))")
echo "training budget ${left}s -> max_steps=$steps"
torchrun --standalone --nproc_per_node $NGPU -m asr.cli.train $COMMON trainer.max_steps=$steps \
  trainer.max_minutes=$(python -c "print(($left-20)/60)") trainer.val_every=$(( steps / 3 + 1 )) \
  trainer.log_every=100 hydra.run.dir=/tmp/run > $OUT/train_stdout.log 2>&1
echo "train ($NGPU GPUs) rc=$? after $(( $(date +%s) - T0 )) s"; grep -E "audio-s/s|WER|wer|stopping" $OUT/train_stdout.log | tail -12
cp /tmp/run/metrics.jsonl /tmp/run/summary.json $OUT/
python tools/export_model.py /tmp/run /tmp/model.pt && split -b 15M /tmp/model.pt $OUT/model.pt.part-
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
