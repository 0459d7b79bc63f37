# Sourced by the device jobs (tools/device/jobs/): install the carried wheels, set the environment
# (fla's autotune cache, NVLink multicast off as the device rules require), restore fla's autotune
# results and record the GPUs in $OUT/gpu.txt. Once per call: a script started by one that already sourced it
# (synth_train.sh -> variants.sh) inherits the environment and skips the rest.
[ -n "${ASR_DEVICE_SETUP_DONE:-}" ] && return 0
# Everything the call prints also goes to $OUT/run.log as it happens: a call cut off at the device's
# time limit returns only $OUT, not the output its caller would have printed at the end.
exec > >(tee -a "$OUT/run.log") 2>&1
python -m pip install --no-deps --no-index -q .gpu/wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc FLA_CACHE_RESULTS=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Dynamo says in the log why it compiles a graph again (a shape or guard that changed), and
# inductor's FX-graph and AOT-autograd caches say hit, miss or why they were bypassed: with the
# trainer's per-shape first-step times this tells a slow start's cause (TORCH_LOGS="" turns it off).
export TORCH_LOGS=${TORCH_LOGS-recompiles,torch._inductor.codecache,torch._functorch._aot_autograd.autograd_cache}
mkdir -p /tmp/tc && tar xzf tools/device/fla_autotune_sm90.tgz -C /tmp/tc
# The compile caches (inductor's and Triton's) of an earlier call, when carried as .gpu/compile_cache
# (parts of one tar.gz that save_compile_cache wrote): a fresh machine then skips most compiling.
if ls .gpu/compile_cache/compile_cache.tgz.part-* >/dev/null 2>&1 && [ ! -d /tmp/inductor ]; then
  cat .gpu/compile_cache/compile_cache.tgz.part-* | tar xzf - -C /tmp && echo "compile cache restored"
fi
# save_compile_cache: the caches as 15 MB parts under $OUT (cat them into .gpu/compile_cache/ here).
save_compile_cache() {
  tar czf - -C /tmp inductor tc 2>/dev/null | split -b 15M - "$OUT/compile_cache.tgz.part-"
  du -ch "$OUT"/compile_cache.tgz.part-* | tail -1
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
export ASR_DEVICE_SETUP_DONE=1
