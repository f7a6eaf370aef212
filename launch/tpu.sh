#!/usr/bin/env bash
# Runs dprdm jobs on a Cloud TPU VM slice, from a workstation with gcloud (logged in, a project
# set), git and tar:
#
#   bash launch/tpu.sh [OPTIONS] NAME ZONE JOB [dprdm flags...]   set the slice up, run the job
#   bash launch/tpu.sh [OPTIONS] NAME ZONE setup                  set the slice up only
#   bash launch/tpu.sh [OPTIONS] NAME ZONE logs JOB               fetch JOB's logs as they are now
#   bash launch/tpu.sh [OPTIONS] NAME ZONE stop                   stop the jobs this script started
#   bash launch/tpu.sh [OPTIONS] NAME ZONE delete                 delete the slice
#
# For example (the work directory on a disk that every worker mounts):
#
#   bash launch/tpu.sh --create v4-32 my-tpu us-central2-b train --config configs/coco.py \
#       --workdir /mnt/shared/paper/unet
#
# A JOB run takes these steps (setup the first three), each a gcloud command:
#  1. describe the slice NAME in ZONE; create it when it is missing and --create asks for it
#  2. copy the code to ~/dprdm-jax on every worker: the files of this working tree (tracked ones,
#     and untracked ones that git does not ignore), or with --ref a commit (git archive). A worker
#     where a job started by this script still runs refuses the copy: stop it first
#  3. set up ~/dprdm-jax/.venv with jax[tpu] on every worker (`launch/local.sh install`: pip runs
#     the first time, and again only when setup.cfg changes)
#  4. run `.venv/bin/dprdm JOB [flags]`, one ssh per worker, all at once. train and embed run on
#     every worker with --distributed: jax.distributed.initialize() joins the workers, each reads
#     its share of the data, and --workdir must be a disk that all of them mount (Filestore NFS,
#     say). Other jobs run as one process, which needs a single-host slice (v4-8, v5litepod-8...):
#     on a multi-host slice every host must run the program. Each worker's job runs under nohup,
#     writes ~/dprdm-jax/logs/JOB-worker-N.log and, while it runs, JOB-worker-N.pid; worker 0's
#     log is shown here as it grows
#  5. when a worker's job fails, stop the job on the others (a distributed job would wait for it
#     forever); then fetch every worker's log into the --logs folder, and name each failed worker
#  6. with --delete, delete the slice, also after a failure (once the logs are fetched)
#
# Ctrl-C or a lost connection ends only the ssh sessions: the jobs run on, and `logs JOB` and
# `stop` reach them later. stop kills only the processes named by the pid files, each only while
# it still is a `.venv/bin/dprdm` process (a pid file of a crashed job may name a reused pid).
#
# Options:
#   --create TYPE      create the slice when it is missing, of accelerator type TYPE (v4-32, ...)
#   --version RUNTIME  its TPU VM runtime (default by TYPE: tpu-ubuntu2204-base for v4,
#                      v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e
#                      for v6e)
#   --ref GIT_REF      copy this commit instead of the working tree
#   --logs DIR         where the logs come back to (default: runs/tpu/NAME in this repository)
#   --delete           delete the slice at the end
#   --dry-run          print each command instead of running it: nothing is created, copied or run
#
# Exit status: 0 when every step and every worker's job succeeded, 1 when one failed, 2 for bad
# arguments (with a usage line).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  echo "usage: bash launch/tpu.sh [--create TYPE [--version RUNTIME]] [--ref GIT_REF]" \
    "[--logs DIR] [--delete] [--dry-run] NAME ZONE JOB [dprdm flags...] | setup | logs JOB |" \
    "stop | delete" >&2
  [ $# -eq 0 ] || echo "launch/tpu.sh: $*" >&2
  exit 2
}

die() {
  echo "launch/tpu.sh: $*" >&2
  exit 1
}

dry=0 create="" version="" ref="" logs="" delete=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --delete) delete=1 ;;
    --create | --version | --ref | --logs)
      [ $# -ge 2 ] && [ -n "$2" ] || usage "$1 needs a value"
      case $1 in
        --create) create=$2 ;;
        --version) version=$2 ;;
        --ref) ref=$2 ;;
        --logs) logs=$2 ;;
      esac
      shift
      ;;
    --) shift; break ;;
    -*) usage "unknown option $1" ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 3 ] || usage "give NAME, ZONE and a JOB (or setup, logs JOB, stop, delete)"
name=$1 zone=$2 job=$3
shift 3
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || usage "bad TPU name '$name'"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage "bad zone '$zone'"
[[ $job =~ ^[a-z][-a-z]*$ ]] || usage "bad job '$job'"

action=run
case $job in
  setup | stop | delete) action=$job; [ $# -eq 0 ] || usage "$job takes no arguments" ;;
  logs)
    action=logs
    [ $# -eq 1 ] && [[ $1 =~ ^[a-z][-a-z]*$ ]] || usage "logs takes one JOB"
    job=$1
    ;;
esac
case $action in
  run | setup) ;;
  *) [ -z "$create$version$ref" ] && [ $delete = 0 ] || usage "$action takes none of --create," \
       "--version, --ref, --delete" ;;
esac
[ -z "$version" ] || [ -n "$create" ] || usage "--version goes with --create"
[ -z "$create" ] || [[ $create =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || usage "bad accelerator type" \
  "'$create' (v4-32, v5litepod-16, v5p-8...)"
if [ -n "$create" ] && [ -z "$version" ]; then
  case $create in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) usage "no default runtime for accelerator type '$create': give --version" ;;
  esac
fi
if [ -n "$ref" ]; then
  git -C "$repo" rev-parse --verify --quiet "$ref^{commit}" >/dev/null || usage "no commit '$ref'"
fi
[ -n "$logs" ] || logs=$repo/runs/tpu/$name
case $logs in /*) ;; *) logs=$PWD/$logs ;; esac

# The jobs that run as one process per worker, joined by jax.distributed.
case $job in
  train | embed) distributed=1 ;;
  *) distributed=0 ;;
esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A word as the shell reads it back: bare when it is safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[-A-Za-z0-9_./=:,+@%]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (--dry-run) or runs it.
run() {
  if [ $dry = 1 ]; then
    local word line=""
    for word in "$@"; do line="$line $(quote "$word")"; done
    echo "${line# }"
  else
    "$@"
  fi
}

# Progress, on stderr (under --dry-run a comment among the commands).
say() {
  if [ $dry = 1 ]; then echo "# $*"; else echo "== $*" >&2; fi
}

tpu() {
  run gcloud compute tpus tpu-vm "$@"
}

ssh_all() {
  tpu ssh "$name" --zone "$zone" --worker=all --command "$1"
}

# Remote shell text: BODY for each pid file in ~/dprdm-jax/logs whose process is still a
# .venv/bin/dprdm process, with $f the file and $pid the process.
each_live_job() {
  # shellcheck disable=SC2016
  printf '%s' 'for f in logs/*.pid; do [ -f "$f" ] || continue; pid=$(cat "$f"); if ps -o args=' \
    ' -p "$pid" 2>/dev/null | grep -qF .venv/bin/dprdm; then ' "$1; fi; done"
}

stop_jobs() {
  # shellcheck disable=SC2016
  ssh_all "cd ~/dprdm-jax 2>/dev/null || exit 0; $(each_live_job \
    'kill "$pid" && echo "$(hostname): stopped $f (pid $pid)"; rm -f "$f"')"
}

finish() {
  if [ $delete = 1 ]; then
    say "deleting $name"
    tpu delete "$name" --zone "$zone" --quiet
  fi
  exit "$1"
}

# Sets $count to the slice's number of workers and $workers to their numbers, creating the slice
# first when it is missing and --create asks for it.
find_slice() {
  local format='--format=value(state,networkEndpoints.len())' info state
  if [ $dry = 1 ]; then
    tpu describe "$name" --zone "$zone" "$format"
    if [ -n "$create" ]; then
      say "when the slice is missing:"
      tpu create "$name" --zone "$zone" --accelerator-type "$create" --version "$version"
    fi
    workers=N count=N
    return
  fi
  if ! info=$(tpu describe "$name" --zone "$zone" "$format" 2>"$tmp/describe.err"); then
    [ -n "$create" ] || { cat "$tmp/describe.err" >&2; die "no slice $name in $zone (give" \
      "--create ACCELERATOR_TYPE to create it)"; }
    say "creating $name ($create, $version) in $zone"
    tpu create "$name" --zone "$zone" --accelerator-type "$create" --version "$version" ||
      finish 1
    info=$(tpu describe "$name" --zone "$zone" "$format") || finish 1
  fi
  read -r state count <<<"$info"
  [ "$state" = READY ] || die "slice $name is ${state:-in an unknown state}, not READY"
  [[ $count =~ ^[1-9][0-9]*$ ]] || die "slice $name reports no workers ('$info')"
  workers=$(seq 0 $((count - 1)) | tr '\n' ' ')
  say "slice $name: $count worker(s)"
}

copy_code() {
  local archive=$tmp/dprdm-jax.tar.gz
  if [ -n "$ref" ]; then
    run git -C "$repo" archive --format=tar.gz -o "$archive" "$ref"
  elif [ $dry = 1 ]; then
    say "a tar of the working tree's files (git ls-files --cached --others --exclude-standard)"
  else
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
      done | tar --null -T - -czf "$archive")
  fi
  say "copying the code to ~/dprdm-jax on every worker"
  tpu scp "$archive" "$name:dprdm-jax.tar.gz" --zone "$zone" --worker=all || finish 1
  local busy
  # shellcheck disable=SC2016
  busy=$(each_live_job 'echo "$(hostname): $f: pid $pid still runs; stop it first" >&2; exit 75')
  local unpack="tar -xzf ~/dprdm-jax.tar.gz && rm ~/dprdm-jax.tar.gz"
  ssh_all "mkdir -p ~/dprdm-jax && cd ~/dprdm-jax || exit 1; $busy; $unpack" || finish 1
}

job_args=""
[ $distributed = 0 ] || job_args=" --distributed"
for arg in "$@"; do
  job_args="$job_args $(quote "$arg")"
done

# The remote command of step $1 (setup, or the job) on worker $2.
remote_command() {
  if [ "$1" = setup ]; then
    echo "cd ~/dprdm-jax && JAX_ACCELERATOR=tpu bash launch/local.sh install"
    return
  fi
  local log="logs/$job-worker-$2" follow=""
  [ "$2" != 0 ] || follow="tail -n +1 -f --pid=\$pid $log.log; "
  echo "cd ~/dprdm-jax || exit 1; mkdir -p logs; : >$log.log; nohup .venv/bin/dprdm" \
    "$job$job_args >>$log.log 2>&1 </dev/null & pid=\$!; echo \$pid >$log.pid;" \
    "${follow}wait \$pid; status=\$?; rm -f $log.pid; exit \$status"
}

# Runs step $1's remote command on every worker, one ssh each, all at once, and waits for them.
# What ssh prints goes to $logs/$1-worker-N.ssh.log (worker 0's to the terminal for the job).
# Sets status[N]. When a worker's command fails (ssh's own failure, status 255, aside), sets $first
# to that worker, and if $1 is the job, stops the jobs on every worker (once).
on_workers() {
  local step=$1 w pid pending still
  first=""
  if [ $dry = 1 ]; then
    say "on each worker N, all at once:"
    tpu ssh "$name" --zone "$zone" --worker=N --command "$(remote_command "$step" N)"
    return
  fi
  mkdir -p "$logs"
  unset pids status
  for w in $workers; do
    if [ "$step" = "$job" ] && [ "$w" = 0 ]; then
      tpu ssh "$name" --zone "$zone" --worker="$w" --command "$(remote_command "$step" "$w")" &
    else
      tpu ssh "$name" --zone "$zone" --worker="$w" --command "$(remote_command "$step" "$w")" \
        >"$logs/$step-worker-$w.ssh.log" 2>&1 &
    fi
    pids[w]=$!
  done
  pending=$workers
  while [ -n "${pending// /}" ]; do
    still=""
    for w in $pending; do
      pid=${pids[w]}
      if kill -0 "$pid" 2>/dev/null; then
        still="$still $w"
        continue
      fi
      status[w]=0
      wait "$pid" || status[w]=$?
      if [ "${status[w]}" != 0 ] && [ "${status[w]}" != 255 ] && [ -z "$first" ]; then
        first=$w
        if [ "$step" = "$job" ]; then
          say "worker $w: dprdm $job ended with status ${status[w]}; stopping the others"
          stop_jobs || true
        fi
      fi
    done
    pending=$still
    [ -z "${pending// /}" ] || sleep 1
  done
}

# Says how each worker's step $1 ended, naming the first that failed; fails when one did not
# succeed.
report() {
  local step=$1 w s bad=0 log
  for w in $workers; do
    s=${status[w]}
    [ "$s" != 0 ] || continue
    bad=1
    log=$logs/$step-worker-$w.ssh.log
    if [ "$s" = 255 ]; then
      echo "launch/tpu.sh: worker $w: the ssh connection failed (status 255, $log); a job there" \
        "may still run: 'logs $job' and 'stop' reach it" >&2
      continue
    fi
    [ "$step" != "$job" ] || log=$logs/$job-worker-$w.log
    if [ "$step" = "$job" ] && [ "$w" != "$first" ] && [ "$s" = 143 ]; then
      echo "launch/tpu.sh: worker $w: stopped after worker $first failed; its log: $log" >&2
    else
      echo "launch/tpu.sh: worker $w failed: $step ended with status $s; its log: $log" >&2
      [ ! -f "$log" ] || tail -n 20 "$log" | sed "s/^/  worker $w | /" >&2
    fi
  done
  return $bad
}

fetch_logs() {
  local w
  say "fetching the logs of $job into $logs"
  if [ $dry = 1 ]; then
    say "from each worker N, all at once:"
    tpu scp "$name:dprdm-jax/logs/$job-worker-N.log" "$logs/" --zone "$zone" --worker=N
    return
  fi
  mkdir -p "$logs"
  for w in $workers; do
    tpu scp "$name:dprdm-jax/logs/$job-worker-$w.log" "$logs/" --zone "$zone" --worker="$w" &
  done
  wait
}

case $action in
  stop) stop_jobs; exit ;;
  delete) delete=1; finish 0 ;;
  logs) find_slice; fetch_logs; exit ;;
esac

find_slice
if [ $distributed = 0 ] && [ "$action" = run ] && [ "$count" != 1 ] && [ $dry = 0 ]; then
  echo "launch/tpu.sh: dprdm $job runs as one process, and every host of a multi-host slice" \
    "must run the program: use a single-host slice (v4-8, v5litepod-8...) or a GPU host" \
    "(launch/gpu.sh)" >&2
  finish 2
fi
copy_code
say "setting up ~/dprdm-jax/.venv (jax[tpu]) on every worker"
on_workers setup
[ $dry = 1 ] || report setup || finish 1
[ "$action" = run ] || finish 0
say "running dprdm $job on every worker; worker 0's log follows"
on_workers "$job"
fetch_logs
[ $dry = 1 ] || report "$job" || finish 1
[ $dry = 1 ] || say "dprdm $job succeeded on every worker; logs in $logs"
finish 0
