#!/usr/bin/env bash
# On the device: probe the training speed, then train the bundled model for the rest of the call.
set -uo pipefail
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-570}
python -m pip install --no-deps --no-index -q .gpu/wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc FLA_CACHE_RESULTS=1
mkdir -p /tmp/tc && tar xzf tools/device/fla_autotune_sm90.tgz -C /tmp/tc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
COMMON="recipe=bundled model=bundled trainer.tensorboard=false trainer.progress_bar=false data.num_workers=15"
timeout 200 python -m asr.cli.train $COMMON trainer.max_steps=60 trainer.log_every=20 trainer.val_every=100000 trainer.save_every=100000 hydra.run.dir=/tmp/probe > $OUT/probe.log 2>&1
echo "probe rc=$? after $(( $(date +%s) - T0 )) s"; cp /tmp/probe/metrics.jsonl $OUT/probe_metrics.jsonl; tail -5 $OUT/probe.log
left=$(( CALL_BUDGET - ($(date +%s) - T0) - 75 ))
steps=$(python -c "
import json; recs=[json.loads(l) for l in open('/tmp/probe/metrics.jsonl') if 'train/steps_per_sec' in l]
rate=recs[-1]['train/steps_per_sec']; print(int(rate*($left-40)*0.97))")
echo "training budget ${left}s -> max_steps=$steps"
python -m asr.cli.train $COMMON trainer.max_steps=$steps trainer.max_minutes=$(python -c "print(($left-25)/60)") trainer.val_every=$(( steps / 3 + 1 )) trainer.log_every=50 hydra.run.dir=/tmp/run > $OUT/train_stdout.log 2>&1
echo "train rc=$? after $(( $(date +%s) - T0 )) s"; tail -15 $OUT/train_stdout.log
cp /tmp/run/metrics.jsonl /tmp/run/summary.json $OUT/
python tools/export_model.py /tmp/run /tmp/model.pt && split -b 15M /tmp/model.pt $OUT/model.pt.part-
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
