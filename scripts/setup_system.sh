#!/usr/bin/env bash
# System toolchains for the MBXP sandbox (evals/sandbox.py, one row each in evals/toolchains.py):
# python3, node + lodash (every MBJSP test does `require("lodash")`), go, g++, a JDK, php, ruby,
# mono (mcs + runtime), TypeScript with the two modules MBTSP prompts import (mathjs, heap-js),
# and util-linux (unshare, prlimit, setpriv).
# Idempotent, run as root on Debian. Fast path: when every tool is already there, apt and npm are
# never touched, so CI reruns take well under a second.
set -euo pipefail

# Debian's node-lodash lives here; evals/sandbox.py puts this directory on NODE_PATH because a
# NodeSource node (as on our dev images) does not search it by default.
NODE_SHARE=/usr/share/nodejs
# npm's global roots (NodeSource's npm, Debian's npm), also on the sandbox's NODE_PATH.
NODE_DIRS="$NODE_SHARE:/usr/lib/node_modules:/usr/local/lib/node_modules"
# Pinned: a new TypeScript may parse differently, which would change pass@1.
NPM_PACKAGES=(typescript@5.9.3 mathjs@15.2.0 heap-js@2.7.2)

have() { command -v "$1" >/dev/null 2>&1; }
have_go() { have go || [ -x /usr/lib/go/bin/go ]; }
have_lodash() { have node && NODE_PATH="$NODE_SHARE" node -e 'require("lodash")' >/dev/null 2>&1; }
# Prints each name@version of NPM_PACKAGES not installed where the sandbox looks (one node start).
npm_missing_list() {
    if ! have node; then printf '%s\n' "${NPM_PACKAGES[@]}"; return; fi
    NODE_PATH="$NODE_DIRS" node -e '
        for (const spec of process.argv.slice(1)) {
            const at = spec.lastIndexOf("@");
            let version = null;
            try { version = require(spec.slice(0, at) + "/package.json").version; } catch (e) {}
            if (version !== spec.slice(at + 1)) console.log(spec);
        }' "${NPM_PACKAGES[@]}"
}

missing=()
have python3 || missing+=(python3)
have node || missing+=(nodejs)
have_lodash || missing+=(node-lodash)
have_go || missing+=(golang-go)
have g++ || missing+=(g++)
{ have javac && have java; } || missing+=(default-jdk-headless)
have php || missing+=(php-cli)
have ruby || missing+=(ruby)
{ have mcs && have mono; } || missing+=(mono-mcs mono-runtime)
{ have unshare && have prlimit && have setpriv; } || missing+=(util-linux)
mapfile -t npm_missing < <(npm_missing_list)
# Debian's nodejs comes without npm; NodeSource's has it built in.
if [ ${#npm_missing[@]} -gt 0 ] && ! have npm; then missing+=(npm); fi

if [ ${#missing[@]} -eq 0 ] && [ ${#npm_missing[@]} -eq 0 ]; then
    echo "setup_system: all toolchains present, nothing to install"
elif [ "$(id -u)" -ne 0 ]; then
    echo "setup_system: missing ${missing[*]} ${npm_missing[*]}; rerun as root" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup_system: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ${#npm_missing[@]} -gt 0 ]; then
    echo "setup_system: installing ${npm_missing[*]} (npm, global)"
    npm install -g --no-audit --no-fund "${npm_missing[@]}"
fi

# golang-go puts `go` in /usr/bin via a symlink; report what the sandbox will find.
for tool in python3 node g++ javac java php ruby mcs mono unshare prlimit setpriv; do
    printf '  %-8s %s\n' "$tool" "$(command -v "$tool")"
done
if have go; then printf '  %-8s %s\n' go "$(go version)"; else printf '  %-8s %s\n' go /usr/lib/go/bin/go; fi
have_lodash && echo "  lodash   $NODE_SHARE/lodash" || { echo "setup_system: lodash not loadable" >&2; exit 1; }
still_missing=$(npm_missing_list)
[ -z "$still_missing" ] || { echo "setup_system: not loadable: $still_missing" >&2; exit 1; }
echo "  npm      ${NPM_PACKAGES[*]}"
