# Sourced by the jobs that take experiment names: check_experiments NAME... fails in one line (exit 2)
# unless every NAME is a config in conf/experiment/, before anything slow runs.
check_experiments() {
  [ $# -gt 0 ] || { echo "name at least one experiment of conf/experiment/ (e.g. bundled_run10_b800_lr2e3)" >&2; exit 2; }
  local name
  for name in "$@"; do
    [ -f "conf/experiment/$name.yaml" ] || { echo "no experiment '$name': conf/experiment/$name.yaml does not exist" >&2; exit 2; }
  done
}
