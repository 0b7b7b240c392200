#!/usr/bin/env bash
# Proves that the package as published installs and runs: packs the main package and the host's
# platform package (npm/<platform>/, made here as the release job makes it),
# installs both tarballs offline into an empty project, runs `npx blockfuse --version` there,
# imports the package, and checks that the native addon comes from the platform package.
#
# Needs a built tree (`npm ci` or `npm run build`): native/blockfuse.<platform>.node and dist/.
# Usage: scripts/pack-smoke.sh            (from anywhere; works on the repository it lives in)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

fail() {
  echo "pack-smoke: FAIL: $*" >&2
  exit 1
}
step() { echo "pack-smoke: $*"; }

name="$(node -p "require('./package.json').name")"
version="$(node -p "require('./package.json').version")"
binary="$(node -p "require('./package.json').napi.binaryName")"

# The generated platform optionalDependencies are added by `napi prepublish` at publish time only.
if node -e "process.exit(require('./package.json').optionalDependencies ? 0 : 1)"; then
  fail "package.json has optionalDependencies; they must not be committed (napi prepublish adds them)"
fi
if node -e "process.exit(Object.keys(require('./package.json').dependencies ?? {}).length ? 0 : 1)"; then
  fail "package.json has runtime dependencies; the offline install below cannot fetch them"
fi

# The host's addon, e.g. native/blockfuse.linux-x64-gnu.node -> platform linux-x64-gnu.
shopt -s nullglob
addons=(native/"$binary".*.node)
shopt -u nullglob
[[ ${#addons[@]} -eq 1 ]] ||
  fail "expected exactly one native/$binary.<platform>.node, found ${#addons[@]} (run npm run build first)"
addon="${addons[0]}"
platform="$(basename "$addon" .node)"
platform="${platform#"$binary".}"
platform_pkg="$name-$platform"
[[ -f dist/cli.js ]] || fail "dist/cli.js is missing (run npm run build first)"

work="$(mktemp -d "${TMPDIR:-/tmp}/blockfuse-pack-smoke.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
tarballs="$work/tarballs"
mkdir -p "$tarballs"

# The platform package, as the release does it: `napi create-npm-dirs` makes npm/<platform>/
# (gitignored), and the host's addon is copied in (what `napi artifacts` does for every target).
step "creating platform package $platform_pkg in npm/$platform"
npx --no -- napi create-npm-dirs >/dev/null || fail "napi create-npm-dirs failed"
[[ -f "npm/$platform/package.json" ]] ||
  fail "napi create-npm-dirs made no npm/$platform (is its target in package.json napi.targets?)"
cp "$addon" "npm/$platform/"

step "npm pack $platform_pkg"
(cd "npm/$platform" && npm pack --pack-destination "$tarballs" >/dev/null) ||
  fail "npm pack of the platform package failed"
step "npm pack $name"
npm pack --pack-destination "$tarballs" >/dev/null || fail "npm pack of $name failed"

main_tgz="$tarballs/$name-$version.tgz"
plat_tgz="$tarballs/$platform_pkg-$version.tgz"
[[ -f "$main_tgz" ]] || fail "missing $main_tgz"
[[ -f "$plat_tgz" ]] || fail "missing $plat_tgz"

# What the main tarball must and must not hold.
main_files="$(tar -tzf "$main_tgz")"
if grep -q '\.node$' <<<"$main_files"; then
  fail "the main tarball contains a .node file:"$'\n'"$(grep '\.node$' <<<"$main_files")"
fi
for f in package/package.json package/dist/cli.js package/dist/index.js package/dist/index.d.ts \
  package/native/binding.cjs package/native/binding.d.cts; do
  grep -qx "$f" <<<"$main_files" || fail "the main tarball lacks ${f#package/}"
done
tar -tzf "$plat_tgz" | grep -qx "package/$binary.$platform.node" ||
  fail "the platform tarball lacks $binary.$platform.node"
step "tarballs: $(du -h "$main_tgz" | cut -f1) $(basename "$main_tgz"), $(du -h "$plat_tgz" | cut -f1) $(basename "$plat_tgz")"

# An empty project, installed from the two tarballs alone.
app="$work/app"
mkdir -p "$app"
cd "$app"
npm init -y >/dev/null
step "npm install --offline (both tarballs) into an empty project"
npm install --offline --no-audit --no-fund "$main_tgz" "$plat_tgz" ||
  fail "offline install of the tarballs failed"

out="$(npx --no -- blockfuse --version)" || fail "npx blockfuse --version exited non-zero"
[[ "$out" == "$name $version" ]] ||
  fail "npx blockfuse --version printed '$out', expected '$name $version'"
step "npx blockfuse --version -> $out"

node --input-type=module -e "
  const m = await import('$name')
  if (typeof m.FuseExport !== 'function') throw new Error('FuseExport is not exported')
  if (typeof m.FuseExport.create !== 'function') throw new Error('FuseExport.create is missing')
  console.log('pack-smoke: import(\"$name\") exports: ' + Object.keys(m).sort().join(', '))
" || fail "importing $name failed"

# The addon must come from the platform package: the only .node installed is there, it loads, and
# without it the loader fails.
nodes="$(find node_modules -name '*.node' -type f)"
[[ "$nodes" == "node_modules/$platform_pkg/$binary.$platform.node" ]] ||
  fail "expected the only addon at node_modules/$platform_pkg/$binary.$platform.node, found: $nodes"
node -e "
  const b = require('./node_modules/$name/native/binding.cjs')
  if (Object.keys(b).length === 0) throw new Error('the binding exports nothing')
" || fail "the native binding did not load from $platform_pkg"
mv "node_modules/$platform_pkg" "$work/$platform_pkg.hidden"
if node -e "require('./node_modules/$name/native/binding.cjs')" 2>/dev/null; then
  fail "the binding loaded without $platform_pkg: it is not the platform package that is used"
fi
mv "$work/$platform_pkg.hidden" "node_modules/$platform_pkg"
step "the native addon is loaded from $platform_pkg"

echo "pack-smoke: OK"
