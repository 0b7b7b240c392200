/**
 * Prepares this machine for `npm test` and puts it back afterwards.
 *
 * What the tests need and the machine can provide, this module provides: missing Debian packages
 * (apt-get; they stay installed), the fuse module, FUSE-over-io_uring switched on (where the kernel
 * has it; without it the io_uring specs check the fallback), /dev/fuse open to
 * other users (the unprivileged specs mount through fusermount3), and /etc/fuse.conf without
 * `user_allow_other` (a spec checks the fallback taken without it). Each change prints one line, and
 * everything but the packages is put back by `restore()`. What it cannot provide (root, /dev/fuse,
 * apt-get) fails with the missing thing and the command that fixes it.
 *
 * A run that is killed (SIGKILL) cannot restore; the changes it made are recorded in STATE_FILE
 * first, and the next run puts them back before it starts.
 *
 * BLOCKFUSE_TEST_PROVISION=off: change nothing, only check and fail on what is missing.
 */
import { spawnSync } from 'node:child_process'
import { accessSync, chmodSync, constants, existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'

const URING_PARAM = '/sys/module/fuse/parameters/enable_uring'
const DEV_FUSE = '/dev/fuse'
const FUSE_CONF = '/etc/fuse.conf'
const STATE_FILE = '/run/blockfuse-test-machine.json'
const TOOLS = JSON.parse(readFileSync(new URL('./test-tools.json', import.meta.url), 'utf8')).tools

/** Thrown for what the machine lacks and this script cannot provide. */
export class MachineError extends Error {}

function say(line) {
  console.log(`blockfuse test: ${line}`)
}

function sh(command, args, options = {}) {
  return spawnSync(command, args, { encoding: 'utf8', ...options })
}

function haveTool(tool) {
  if (tool.startsWith('/')) return existsSync(tool)
  return sh('sh', ['-c', `command -v '${tool}'`]).status === 0
}

function fuseInKernel() {
  return /\bfuse$/m.test(readFileSync('/proc/filesystems', 'utf8'))
}

/** The changes a run made, in the order made, as written to STATE_FILE. */
function recordChanges(changes) {
  if (changes.length === 0) rmSync(STATE_FILE, { force: true })
  else writeFileSync(STATE_FILE, JSON.stringify({ pid: process.pid, changes }))
}

function pidAlive(pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return err.code === 'EPERM'
  }
}

/** Puts back one recorded change. */
function undo(change) {
  switch (change.kind) {
    case 'enable_uring':
      writeFileSync(URING_PARAM, change.before)
      say(`put back ${URING_PARAM} = ${change.before}`)
      break
    case 'dev_fuse_mode':
      chmodSync(DEV_FUSE, change.before)
      say(`put back the mode of ${DEV_FUSE} to 0${change.before.toString(8)}`)
      break
    case 'fuse_conf':
      writeFileSync(FUSE_CONF, change.before)
      say(`put back ${FUSE_CONF} (user_allow_other enabled again)`)
      break
  }
}

/** A run that was killed left changes behind: put them back before this run starts. */
function restoreKilledRun() {
  let state
  try {
    state = JSON.parse(readFileSync(STATE_FILE, 'utf8'))
  } catch {
    return
  }
  if (pidAlive(state.pid) && state.pid !== process.pid) {
    throw new MachineError(
      `another npm test (pid ${state.pid}) is running on this machine; wait for it (its state is in ${STATE_FILE})`,
    )
  }
  say(`an earlier run (pid ${state.pid}) ended without putting the machine back; doing it now`)
  for (const change of state.changes.toReversed()) undo(change)
  rmSync(STATE_FILE, { force: true })
}

function checkRoot() {
  if (process.getuid() !== 0) {
    throw new MachineError(
      `the tests need root (they mount with mount(2), switch users and change kernel settings); ` +
        `you are uid ${process.getuid()}: run \`sudo npm test\``,
    )
  }
}

function ensureFuse(provision) {
  if (!fuseInKernel() && provision) {
    const r = sh('modprobe', ['fuse'])
    if (r.status === 0) say('loaded the fuse kernel module (modprobe fuse)')
  }
  if (!fuseInKernel()) {
    throw new MachineError(
      'the kernel has no FUSE file system: run `modprobe fuse` (in a container, load it on the host)',
    )
  }
  if (!existsSync(DEV_FUSE)) {
    throw new MachineError(
      `${DEV_FUSE} does not exist: run \`mknod -m 0666 /dev/fuse c 10 229\`, or start the container with \`--device /dev/fuse\``,
    )
  }
  try {
    accessSync(DEV_FUSE, constants.R_OK | constants.W_OK)
  } catch (err) {
    throw new MachineError(
      `${DEV_FUSE} cannot be opened (${err.message}): start the container with \`--device /dev/fuse\``,
    )
  }
}

function ensurePackages(provision) {
  const missing = Object.keys(TOOLS).filter((tool) => !haveTool(tool))
  if (missing.length === 0) return
  const packages = [...new Set(missing.map((tool) => TOOLS[tool]))].sort()
  const fix = `apt-get install ${packages.join(' ')}`
  if (!provision) throw new MachineError(`missing ${missing.join(', ')}: run \`${fix}\``)
  if (!haveTool('apt-get')) {
    throw new MachineError(`missing ${missing.join(', ')} and there is no apt-get here: install ${packages.join(', ')}`)
  }
  say(`installing ${packages.join(' ')} with apt-get (for ${missing.join(', ')})`)
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
  const update = sh('apt-get', ['update', '-q'], { env, stdio: 'inherit' })
  if (update.status !== 0)
    throw new MachineError(`\`apt-get update\` failed (exit ${update.status}); then run \`${fix}\``)
  const install = sh('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...packages], {
    env,
    stdio: 'inherit',
  })
  if (install.status !== 0) throw new MachineError(`\`${fix}\` failed (exit ${install.status})`)
  const still = missing.filter((tool) => !haveTool(tool))
  if (still.length > 0) throw new MachineError(`still missing after \`${fix}\`: ${still.join(', ')}`)
  say(`installed ${packages.join(' ')} (packages stay installed)`)
}

function checkFusermount() {
  const path = sh('sh', ['-c', 'command -v fusermount3']).stdout.trim()
  const st = statSync(path)
  if ((st.mode & 0o4000) === 0 || st.uid !== 0) {
    throw new MachineError(
      `${path} is not setuid root, so ordinary users cannot mount: run \`apt-get install --reinstall fuse3\``,
    )
  }
}

/** Mounts a FUSE file system over a regular file (what an export does) with nobody serving it. */
function probeMount() {
  const dir = sh('mktemp', ['-d', '/tmp/blockfuse-fuse-probe.XXXXXX']).stdout.trim()
  const script = `set -eu
    touch "$1"
    exec 3<>/dev/fuse
    mount -i -t fuse -o fd=3,rootmode=100000,user_id=0,group_id=0,ro blockfuse-test-probe "$1"
    exec 3>&-
    umount "$1"`
  const r = sh('timeout', ['30', 'bash', '-c', script, 'probe', `${dir}/mnt`])
  sh('umount', ['-l', `${dir}/mnt`])
  rmSync(dir, { recursive: true, force: true })
  if (r.status !== 0) {
    throw new MachineError(
      `a FUSE mount fails on this machine (${(r.stderr || r.stdout).trim()}): FUSE cannot be used here`,
    )
  }
}

/**
 * Checks the machine and makes the changes the tests need. Returns `restore()`, which puts back
 * every change (idempotent; call it on every exit path).
 */
export function prepareMachine({ provision = process.env.BLOCKFUSE_TEST_PROVISION !== 'off' } = {}) {
  checkRoot()
  if (provision) restoreKilledRun()
  if (!provision) say('BLOCKFUSE_TEST_PROVISION=off: checking the machine, changing nothing')
  ensureFuse(provision)
  ensurePackages(provision)
  checkFusermount()
  probeMount()

  const changes = []
  const change = (c, apply) => {
    changes.push(c)
    recordChanges(changes)
    apply()
  }
  const restore = () => {
    for (const c of changes.splice(0).toReversed()) {
      try {
        undo(c)
      } catch (err) {
        console.error(`blockfuse test: could not put back ${c.kind}: ${err.message}`)
      }
    }
    recordChanges(changes)
  }

  try {
    const uring = existsSync(URING_PARAM) ? readFileSync(URING_PARAM, 'utf8').trim() : undefined
    if (uring === undefined) {
      // Nothing to switch on: the io_uring specs then check the documented read(2) fallback.
      say(
        `this kernel has no FUSE-over-io_uring (${URING_PARAM} is missing; Linux 6.14+ with CONFIG_FUSE_IO_URING has it): the io_uring specs check the read(2) fallback instead`,
      )
    } else if (uring !== 'Y') {
      if (!provision) throw new MachineError(`FUSE-over-io_uring is off: run \`echo Y > ${URING_PARAM}\``)
      change({ kind: 'enable_uring', before: uring }, () => writeFileSync(URING_PARAM, 'Y'))
      say(`switched FUSE-over-io_uring on for the run (${URING_PARAM}: ${uring} -> Y)`)
    }

    const mode = statSync(DEV_FUSE).mode & 0o7777
    if ((mode & 0o666) !== 0o666) {
      if (!provision) throw new MachineError(`other users cannot open ${DEV_FUSE}: run \`chmod 0666 ${DEV_FUSE}\``)
      change({ kind: 'dev_fuse_mode', before: mode }, () => chmodSync(DEV_FUSE, 0o666))
      say(`opened ${DEV_FUSE} to other users for the run (mode 0${mode.toString(8)} -> 0666)`)
    }

    const conf = existsSync(FUSE_CONF) ? readFileSync(FUSE_CONF, 'utf8') : ''
    if (/^\s*user_allow_other\s*$/m.test(conf)) {
      if (!provision)
        throw new MachineError(`${FUSE_CONF} enables user_allow_other; a spec needs it off: comment it out`)
      change({ kind: 'fuse_conf', before: conf }, () =>
        writeFileSync(FUSE_CONF, conf.replace(/^(\s*user_allow_other\s*)$/m, '#$1')),
      )
      say(`turned user_allow_other off in ${FUSE_CONF} for the run`)
    }
  } catch (err) {
    restore()
    throw err
  }
  return restore
}
