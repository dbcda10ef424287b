#!/usr/bin/env bash
# Stop what the start-*.sh scripts started, and only that: each recorded process and everything
# below it (Ray workers and job drivers run in their own process groups, so a group kill misses them).
set -uo pipefail
source "$(dirname "$0")/env.sh"

# descendants PID...: the given processes and all below them, from one snapshot of the process table.
descendants() {
  ps -e -o pid=,ppid= | awk -v roots="$*" '
    { parent[$1] = $2 }
    END {
      n = split(roots, found, " "); for (i = 1; i <= n; i++) keep[found[i]] = 1
      do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
      for (p in keep) print p
    }'
}

# Live processes among the given ones (a zombie, which nobody may reap here, does not count).
alive() { ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }'; }

roots=()
for pid_file in "$FLEXKD_CLUSTER_DIR"/*.pid; do
  [ -e "$pid_file" ] || continue
  pid=$(cat "$pid_file")
  # A stale pid file may name a process that reused the pid: only take ours, by its command line.
  if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -e "$FLEXKD_CLUSTER_DIR" -e "$MLFLOW_DIR"; then
    roots+=("$pid")
  fi
  rm -f "$pid_file"
done
[ ${#roots[@]} -eq 0 ] && { echo "nothing to stop in $FLEXKD_CLUSTER_DIR"; exit 0; }

pids=$(descendants "${roots[@]}")
kill -TERM $pids 2>/dev/null
for _ in $(seq 15); do
  [ -z "$(alive $pids)" ] && break
  sleep 1
done
remaining=$(alive $pids)
[ -n "$remaining" ] && kill -KILL $remaining 2>/dev/null
echo "stopped $(echo $pids | wc -w) processes of the cluster in $FLEXKD_CLUSTER_DIR"
