/**
 * Which prebuilt native addon this machine needs, and what to tell a user whose addon does not load.
 * The addon comes from one optional dependency per platform (`blockfuse-linux-x64-gnu`, ...), which
 * npm installs only on the matching machine; this module names the one that was expected.
 *
 * @module
 */
import { existsSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'

/**
 * The platforms a prebuilt addon is published for, as napi-rs names them (package.json
 * `napi.targets`; a spec checks that both lists agree).
 */
export const SUPPORTED_PLATFORMS = ['linux-x64-gnu', 'linux-arm64-gnu', 'linux-x64-musl', 'linux-arm64-musl'] as const

/** The main package's name; each platform package is `<name>-<platform>`. */
const PACKAGE_NAME = 'blockfuse'

/** Whether this Linux runs on musl (Alpine) rather than glibc; the same tests napi-rs's loader makes. */
function isMusl(): boolean {
  try {
    return readFileSync('/usr/bin/ldd', 'utf8').includes('musl')
  } catch {
    // No ldd script: ask Node itself (its report names the glibc it runs on, if any).
  }
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return report?.header?.glibcVersionRuntime === undefined
}

/** This machine's platform as napi-rs names it, e.g. `linux-x64-gnu`, `linux-arm64-musl`, `darwin-arm64`. */
export function detectPlatform(): string {
  if (process.platform !== 'linux') return `${process.platform}-${process.arch}`
  return `linux-${process.arch}-${isMusl() ? 'musl' : 'gnu'}`
}

/** The package that carries the addon for `platform`. */
export function platformPackage(platform: string): string {
  return `${PACKAGE_NAME}-${platform}`
}

/** What a failed load of the native binding means, for the current installation. */
export interface LoadFailureContext {
  /** The platform detected (see {@link detectPlatform}). */
  platform: string
  /** Whether the package directory is a source checkout (has the Rust sources). */
  sourceCheckout: boolean
  /** Whether the platform package can be resolved from the main package. */
  platformPackageInstalled: boolean
}

/** Looks at this installation: the platform, a source checkout or not, the platform package present. */
export function loadFailureContext(): LoadFailureContext {
  const platform = detectPlatform()
  // ts/ and dist/ are one level below the package root; Cargo.toml is never published.
  const sourceCheckout = existsSync(new URL('../Cargo.toml', import.meta.url))
  let platformPackageInstalled = false
  try {
    createRequire(import.meta.url).resolve(`${platformPackage(platform)}/package.json`)
    platformPackageInstalled = true
  } catch {
    // not installed (or not resolvable from here, which is the same to the loader)
  }
  return { platform, sourceCheckout, platformPackageInstalled }
}

/**
 * The message of a `NATIVE_LOAD_FAILED`: the platform detected, the package expected, and the fix.
 * `reason` is the loader's own error message.
 */
export function loadFailureMessage(context: LoadFailureContext, reason: string): string {
  const { platform, sourceCheckout, platformPackageInstalled } = context
  const expected = platformPackage(platform)
  const supported = (SUPPORTED_PLATFORMS as readonly string[]).includes(platform)
  if (sourceCheckout) {
    return (
      `cannot load the native addon (native/binding.cjs) for ${platform}: ${reason}; ` +
      'this is a source checkout: build the addon with `npm run build:native`'
    )
  }
  if (!supported) {
    return (
      `blockfuse has no prebuilt native addon for this platform (${platform}); it supports ` +
      `${SUPPORTED_PLATFORMS.join(', ')}. To use it here, build it from source ` +
      '(a Rust toolchain and `npm run build` in a clone of its repository).'
    )
  }
  if (!platformPackageInstalled) {
    return (
      `blockfuse's native addon for this platform (${platform}) is missing: it comes from the package ` +
      `${expected}, an optional dependency of blockfuse, which is not installed. Fix: install again ` +
      'without omitting optional dependencies (no `--omit=optional`, `--no-optional` or ' +
      '`npm_config_omit=optional`); if the lockfile was made on another platform, remove ' +
      `node_modules and package-lock.json and run \`npm install\`, or add it: \`npm install ${expected}\`.`
    )
  }
  return (
    `blockfuse's native addon for this platform (${platform}) is installed (${expected}) but does not load: ` +
    `${reason}. Fix: install the same version of blockfuse and ${expected} again (\`npm install\`); ` +
    `supported platforms: ${SUPPORTED_PLATFORMS.join(', ')}.`
  )
}
