#!/usr/bin/env bash
# Release rehearsal: runs the publish job's steps against a private npm registry on this machine,
# then installs `blockfuse` from that registry alone, as a user would, and uses it.
#
#   1. starts verdaccio (npm package, pinned below) on 127.0.0.1 with a temporary config that lets
#      anyone publish, no uplink (nothing comes from anywhere else), and a temporary npmrc with a
#      dummy token;
#   2. in a temporary copy of the package whose napi targets are narrowed to this host's, runs the
#      release job's steps: `napi create-npm-dirs`, the build artifact in artifacts/ and `napi
#      artifacts`, then `npm publish`, whose prepublishOnly (scripts/prepublish.mjs) runs `napi
#      prepublish -t npm` (publishes the platform package, adds optionalDependencies) and drops
#      `prepare` from the manifest;
#   3. checks the published manifests and tarballs: repository (provenance needs it) in both, no
#      install-time scripts, no .node in the main tarball, no dist/testing.* or dist/demo.*;
#   4. in an empty project, `npm install blockfuse`: the platform package must arrive through
#      optionalDependencies; `npx blockfuse --version`; a real null export (mount, dd through it,
#      SIGTERM, unmounted); `import { FuseExport } from 'blockfuse'` type-checks with tsc;
#   5. in another empty project, `npm install --omit=optional blockfuse`: create() must fail with
#      NATIVE_LOAD_FAILED naming the platform, the missing package and the fix.
#
# Needs root (the export mounts with mount(2)) and a built tree (`npm ci`: dist/, native/). The
# registry package is installed into ~/.cache/blockfuse-ci (cached); everything else is temporary
# and removed, and the registry is stopped, also on failure.
#
# Usage: scripts/release-rehearsal.sh     (from anywhere)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
VERDACCIO_VERSION=6.8.0
cache="${BLOCKFUSE_CI_CACHE:-$HOME/.cache/blockfuse-ci}"

step() { echo "release-rehearsal: $*"; }
fail() {
  echo "release-rehearsal: FAIL: $*" >&2
  exit 1
}

[[ $(id -u) -eq 0 ]] || fail "run as root (the export in the installed package mounts with mount(2))"
name="$(node -p "require('./package.json').name")"
version="$(node -p "require('./package.json').version")"
# The GitHub repository the rehearsed publish job pretends to run in (scripts/repository-urls.sh).
rehearsal_repo=rehearsal-owner/blockfuse-rehearsal
binary="$(node -p "require('./package.json').napi.binaryName")"
shopt -s nullglob
addons=(native/"$binary".*.node)
shopt -u nullglob
[[ ${#addons[@]} -eq 1 ]] || fail "expected one native/$binary.<platform>.node, found ${#addons[@]} (run npm ci first)"
platform="$(basename "${addons[0]}" .node)"
platform="${platform#"$binary".}"
platform_pkg="$name-$platform"
target="$(node -e "
  const t = require('./package.json').napi.targets
  const want = { 'linux-x64-gnu': 'x86_64-unknown-linux-gnu', 'linux-arm64-gnu': 'aarch64-unknown-linux-gnu',
    'linux-x64-musl': 'x86_64-unknown-linux-musl', 'linux-arm64-musl': 'aarch64-unknown-linux-musl' }['$platform']
  if (!t.includes(want)) process.exit(1)
  console.log(want)
")" || fail "the host platform $platform is not among package.json napi.targets"
[[ -f dist/cli.js && -f native/binding.cjs ]] || fail "dist/ or native/binding.cjs is missing (run npm ci first)"
# napi prepublish adds the platform packages at publish time; committed ones would go stale.
node -e "process.exit(require('./package.json').optionalDependencies ? 1 : 0)" ||
  fail "package.json has optionalDependencies; they must not be committed (napi prepublish adds them)"

# --- the registry -----------------------------------------------------------------------------
verdaccio_dir="$cache/verdaccio-$VERDACCIO_VERSION"
if [[ ! -f "$verdaccio_dir/node_modules/verdaccio/package.json" ]]; then
  step "installing verdaccio@$VERDACCIO_VERSION into $verdaccio_dir"
  mkdir -p "$verdaccio_dir"
  npm install --prefix "$verdaccio_dir" --no-audit --no-fund --loglevel=error "verdaccio@$VERDACCIO_VERSION" >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/blockfuse-release.XXXXXX")"
registry_pid=
cli_pid=
cleanup() {
  # Best effort, and never the exit status: the script's own status stands.
  set +e
  [[ -n $cli_pid ]] && kill -KILL "$cli_pid" 2>/dev/null
  findmnt -rn -M "$work/app/null.mnt" >/dev/null 2>&1 && umount -l "$work/app/null.mnt"
  if [[ -n $registry_pid ]]; then
    kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$(node -e "const s = require('net').createServer().listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close() })")"
registry="http://127.0.0.1:$port/"
cat >"$work/verdaccio.yaml" <<EOF
storage: $work/storage
auth:
  htpasswd:
    file: $work/htpasswd
    max_users: -1
uplinks: {}
packages:
  '**':
    access: \$all
    publish: \$anonymous
    unpublish: \$anonymous
log: { type: stdout, format: pretty, level: warn }
EOF
node "$verdaccio_dir/node_modules/verdaccio/bin/verdaccio" --config "$work/verdaccio.yaml" \
  --listen "127.0.0.1:$port" >"$work/verdaccio.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 150); do
  curl -fsS "${registry}-/ping" >/dev/null 2>&1 && break
  kill -0 "$registry_pid" 2>/dev/null || fail "verdaccio exited: $(cat "$work/verdaccio.log")"
  sleep 0.2
done
curl -fsS "${registry}-/ping" >/dev/null || fail "verdaccio does not answer on $registry"
step "verdaccio $VERDACCIO_VERSION on $registry (no uplinks)"

# Every npm below talks to this registry only, with its own npmrc and cache.
cat >"$work/npmrc" <<EOF
registry=$registry
//127.0.0.1:$port/:_authToken=dummy-token-for-the-rehearsal
EOF
export npm_config_userconfig="$work/npmrc"
export npm_config_registry="$registry"
export npm_config_cache="$work/npm-cache"
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

# --- the publish job, in a copy narrowed to this host -------------------------------------------
pub="$work/publish"
mkdir -p "$pub/native" "$pub/npm" "$pub/scripts" "$pub/artifacts/bindings-$target"
cp package.json README.md LICENSE "$pub/"
cp -r dist "$pub/"
cp native/binding.cjs native/binding.d.cts "$pub/native/"
cp scripts/prepublish.mjs scripts/repository-urls.sh "$pub/scripts/"
ln -s "$repo/node_modules" "$pub/node_modules"
node -e "
  const fs = require('fs'), p = '$pub/package.json', m = JSON.parse(fs.readFileSync(p, 'utf8'))
  m.napi.targets = ['$target']
  fs.writeFileSync(p, JSON.stringify(m, null, 2) + '\n')
"
# What the build job uploads (the addon with the loader) and download-artifact lays out.
cp "${addons[0]}" native/binding.cjs native/binding.d.cts "$pub/artifacts/bindings-$target/"
(
  cd "$pub"
  # The job runs on a checkout of the release commit (napi prepublish reads its message); no
  # GITHUB_REPOSITORY here, so no GitHub release is attempted.
  unset GITHUB_REPOSITORY GITHUB_TOKEN
  printf 'node_modules\n' >.gitignore
  git init -q && git add -A &&
    git -c user.name=rehearsal -c user.email=rehearsal@localhost commit -qm "$version" ||
    fail "cannot make the release commit in the copy"
  step "publish job: scripts/repository-urls.sh (as for a repository $rehearsal_repo)"
  GITHUB_SERVER_URL=https://github.com GITHUB_REPOSITORY="$rehearsal_repo" bash scripts/repository-urls.sh >/dev/null ||
    fail "scripts/repository-urls.sh failed"
  step "publish job: napi create-npm-dirs"
  npx --no -- napi create-npm-dirs >/dev/null
  step "publish job: npm run artifacts (napi artifacts)"
  npm run --silent artifacts >/dev/null
  [[ -f "npm/$platform/$binary.$platform.node" ]] || fail "napi artifacts did not put the addon into npm/$platform"
  step "publish job: npm publish (prepublishOnly: napi prepublish -t npm, then prepare dropped)"
  npm publish --access public >"$work/publish.log" 2>&1 || fail "npm publish failed: $(cat "$work/publish.log")"
) || exit 1

# --- what was published -----------------------------------------------------------------------
npm view "$name@$version" --json >"$work/main.json" || fail "$name@$version is not in the registry"
npm view "$platform_pkg@$version" --json >"$work/platform.json" || fail "$platform_pkg@$version is not in the registry"
node -e "
  const fs = require('fs')
  const main = JSON.parse(fs.readFileSync('$work/main.json', 'utf8'))
  const plat = JSON.parse(fs.readFileSync('$work/platform.json', 'utf8'))
  const problems = []
  for (const [what, m] of [['$name', main], ['$platform_pkg', plat]]) {
    if (m.repository?.url !== 'git+https://github.com/$rehearsal_repo.git')
      problems.push(what + ' has repository ' + JSON.stringify(m.repository) + ', not the workflow\'s repository (npm provenance checks it)')
    for (const s of ['preinstall', 'install', 'postinstall', 'prepare'])
      if (m.scripts?.[s] !== undefined) problems.push(what + ' would run scripts.' + s + ' at install time')
  }
  if (main.optionalDependencies?.['$platform_pkg'] !== '$version')
    problems.push('$name does not list $platform_pkg@$version in optionalDependencies: ' + JSON.stringify(main.optionalDependencies))
  if (problems.length) { console.error(problems.join('\n')); process.exit(1) }
  console.log('release-rehearsal: published $name@$version (optionalDependencies ' +
    JSON.stringify(main.optionalDependencies) + ') and $platform_pkg@$version (os ' + plat.os + ', cpu ' +
    plat.cpu + (plat.libc ? ', libc ' + plat.libc : '') + '); both name the workflow\'s repository, neither runs install scripts')
" || fail "the published manifests are not right"
mkdir -p "$work/tarballs"
(cd "$work/tarballs" && npm pack --silent "$name@$version" "$platform_pkg@$version" >/dev/null)
main_files="$(tar -tzf "$work/tarballs/$name-$version.tgz")"
! grep -q '\.node$' <<<"$main_files" || fail "the main tarball contains a .node file"
! grep -Eq '^package/dist/(testing|demo)\.' <<<"$main_files" ||
  fail "the main tarball ships test or demo code: $(grep -E '^package/dist/(testing|demo)\.' <<<"$main_files" | tr '\n' ' ')"
for f in package/dist/cli.js package/dist/index.js package/dist/index.d.ts package/native/binding.cjs \
  package/native/binding.d.cts package/README.md package/LICENSE; do
  grep -qx "$f" <<<"$main_files" || fail "the main tarball lacks ${f#package/}"
done
tar -tzf "$work/tarballs/$platform_pkg-$version.tgz" | grep -qx "package/$binary.$platform.node" ||
  fail "the platform tarball lacks $binary.$platform.node"
step "tarballs: $name $(du -h "$work/tarballs/$name-$version.tgz" | cut -f1) ($(wc -l <<<"$main_files") files), $platform_pkg $(du -h "$work/tarballs/$platform_pkg-$version.tgz" | cut -f1)"

# --- a user's project -------------------------------------------------------------------------
app="$work/app"
mkdir -p "$app"
cd "$app"
npm init -y >/dev/null
step "npm install $name (from $registry alone)"
npm install --loglevel=error "$name" >/dev/null || fail "npm install $name failed"
[[ -f "node_modules/$platform_pkg/$binary.$platform.node" ]] || fail "$platform_pkg was not installed"
node -e "
  const lock = require('./package-lock.json')
  const p = lock.packages['node_modules/$platform_pkg']
  if (!p || p.optional !== true) throw new Error('$platform_pkg is not in the lockfile as an optional dependency: ' + JSON.stringify(p))
  if (!p.resolved.startsWith('$registry')) throw new Error('$platform_pkg came from ' + p.resolved)
" || fail "the platform package did not arrive through optionalDependencies"
step "$platform_pkg arrived through optionalDependencies"

out="$(npx --no -- blockfuse --version)" || fail "npx blockfuse --version failed"
[[ $out == "$name $version" ]] || fail "npx blockfuse --version printed '$out', expected '$name $version'"
step "npx blockfuse --version -> $out"

touch null.mnt
# The bin npm linked (what npx runs), started directly so that SIGTERM reaches blockfuse itself.
node_modules/.bin/blockfuse export null:64M null.mnt >cli.out 2>cli.err &
cli_pid=$!
for _ in $(seq 1 150); do
  grep -q '^ready' cli.out && break
  kill -0 "$cli_pid" 2>/dev/null || break
  sleep 0.1
done
grep -q '^ready' cli.out || fail "the export did not become ready: $(cat cli.out cli.err)"
[[ $(stat -c %s null.mnt) -eq $((64 << 20)) ]] || fail "the export is not 64 MiB"
dd if=null.mnt of=/dev/null bs=1M status=none || fail "dd through the export failed"
cmp -n $((64 << 20)) null.mnt /dev/zero || fail "the null export does not read as zeros"
kill -TERM "$cli_pid"
status=0
wait "$cli_pid" || status=$?
cli_pid=
[[ $status -eq 0 ]] || fail "blockfuse exited $status after SIGTERM: $(cat cli.err)"
! findmnt -rn -M "$app/null.mnt" >/dev/null || fail "null.mnt is still mounted"
step "blockfuse export null:64M: $(head -n1 cli.out | cut -c1-100)...; dd read 64 MiB of zeros; SIGTERM unmounted it"

# Type-check a user's module with the repository's TypeScript and Node types (the registry has
# only blockfuse), against the installed declarations.
cat >main.ts <<'EOF'
import { FuseExport, isBlockfuseError, type FuseExportOptions } from 'blockfuse'

const options: FuseExportOptions = { source: 'null:1G', mountpoint: 'null.mnt' }
export async function run(): Promise<number> {
  try {
    await using exp = await FuseExport.create(options)
    return exp.size
  } catch (err) {
    if (isBlockfuseError(err, 'MOUNT_FAILED')) return -1
    // @ts-expect-error: a misspelt error code does not compile
    if (isBlockfuseError(err, 'MOUNT_FAILD')) return -2
    throw err
  }
}
EOF
cat >tsconfig.json <<EOF
{
  "compilerOptions": {
    "module": "nodenext",
    "target": "es2022",
    "lib": ["es2022", "esnext.disposable"],
    "strict": true,
    "noEmit": true,
    "typeRoots": ["$repo/node_modules/@types"],
    "types": ["node"]
  },
  "files": ["main.ts"]
}
EOF
node -e "const fs = require('fs'), p = JSON.parse(fs.readFileSync('package.json')); p.type = 'module'; fs.writeFileSync('package.json', JSON.stringify(p, null, 2))"
"$repo/node_modules/.bin/tsc" -p tsconfig.json || fail "tsc rejected: import { FuseExport } from '$name'"
step "tsc type-checks import { FuseExport, isBlockfuseError } from '$name' (and rejects a misspelt code)"

# --- without the platform package -------------------------------------------------------------
bare="$work/bare"
mkdir -p "$bare"
cd "$bare"
npm init -y >/dev/null
npm install --loglevel=error --omit=optional "$name" >/dev/null || fail "npm install --omit=optional $name failed"
[[ ! -e "node_modules/$platform_pkg" ]] || fail "--omit=optional installed $platform_pkg anyway"
touch x.mnt
msg="$(node --input-type=module -e "
  import { FuseExport } from '$name'
  try {
    await FuseExport.create({ source: 'null:1M', mountpoint: 'x.mnt' })
    console.log('created?!')
  } catch (err) {
    console.log(err.code + ': ' + err.message)
  }
")"
for want in "NATIVE_LOAD_FAILED:" "($platform)" "$platform_pkg" "optional"; do
  [[ $msg == *"$want"* ]] || fail "without $platform_pkg, create() said: $msg (expected it to mention '$want')"
done
step "without $platform_pkg (--omit=optional): $msg"

step "OK"
