# Shared shell helpers for the project's scripts (sourced, not run).

# apt_install PKG...: installs the packages not installed yet; packages may not start services
# (the scripts start what the tests need themselves).
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "${0##*/}: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

# Process start time (field 22 of /proc/PID/stat), empty if gone. Used against pid reuse.
starttime() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }            # drop "pid (comm) "
  # shellcheck disable=SC2086
  set -- $s              # now $1 = state, $20 = starttime
  echo "${20}"
}

# Alive = exists and is not a zombie (PID 1 here may not reap quickly).
alive() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ] && [ "${s%% *}" != X ]
}

# alive_as PID STARTTIME: the same process is still alive.
alive_as() { alive "$1" && [ "$(starttime "$1")" = "$2" ]; }

# kill_wait PID STARTTIME [GRACE_SECONDS [SIGNAL]]: SIGNAL (TERM), wait up to the grace,
# SIGKILL, wait. Fails if the process outlives SIGKILL.
kill_wait() {
  local pid=$1 st=$2 grace=${3:-5} sig=${4:-TERM} i
  alive_as "$pid" "$st" || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 20; i++)); do
    alive_as "$pid" "$st" || return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive_as "$pid" "$st" || return 0
    sleep 0.05
  done
  echo "${0##*/}: pid $pid survived SIGKILL" >&2
  return 1
}
