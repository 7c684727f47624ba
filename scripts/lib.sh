# Sourced by scripts/real_engine.sh and scripts/real_vllm.sh (not run): their log lines, timing
# and the lock on their cache. The sourcing script sets LOG_TAG (the log lines' prefix) first.

log() { echo "[$LOG_TAG] $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# lock FILE: serialise every step that writes the cache (a concurrent run waits, then finds it
# done). The lock is held on descriptor 9 until the script exits.
lock() {
  mkdir -p "$(dirname "$1")"
  exec 9>"$1"
  flock -n 9 || { log "another run holds $1; waiting for it"; flock 9; }
}
