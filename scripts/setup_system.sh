#!/usr/bin/env bash
# System toolchains for the MBXP sandbox (evals/sandbox.py): python3, node + lodash (every MBJSP
# test does `require("lodash")`), go, g++, and util-linux (unshare, prlimit, setpriv).
# Idempotent, run as root on Debian. Fast path: when every tool is already there, apt is never
# touched, so CI reruns take well under a second.
set -euo pipefail

# Debian's node-lodash lives here; evals/sandbox.py puts this directory on NODE_PATH because a
# NodeSource node (as on our dev images) does not search it by default.
NODE_SHARE=/usr/share/nodejs

have() { command -v "$1" >/dev/null 2>&1; }
have_go() { have go || [ -x /usr/lib/go/bin/go ]; }
have_lodash() { have node && NODE_PATH="$NODE_SHARE" node -e 'require("lodash")' >/dev/null 2>&1; }

missing=()
have python3 || missing+=(python3)
have node || missing+=(nodejs)
have_lodash || missing+=(node-lodash)
have_go || missing+=(golang-go)
have g++ || missing+=(g++)
{ have unshare && have prlimit && have setpriv; } || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup_system: all toolchains present, nothing to install"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup_system: missing ${missing[*]}; rerun as root" >&2
        exit 1
    fi
    echo "setup_system: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# golang-go puts `go` in /usr/bin via a symlink; report what the sandbox will find.
for tool in python3 node g++ unshare prlimit setpriv; do
    printf '  %-8s %s\n' "$tool" "$(command -v "$tool")"
done
if have go; then printf '  %-8s %s\n' go "$(go version)"; else printf '  %-8s %s\n' go /usr/lib/go/bin/go; fi
have_lodash && echo "  lodash   $NODE_SHARE/lodash" || { echo "setup_system: lodash not loadable" >&2; exit 1; }
