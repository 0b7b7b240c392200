/**
 * ts/platform.ts: the platform detected, the package expected, and what a user whose native addon
 * does not load is told (the release rehearsal checks the real case, an install without it).
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { detectPlatform, loadFailureMessage, platformPackage, SUPPORTED_PLATFORMS } from '../ts/platform.js'

const TRIPLE_TO_PLATFORM: Record<string, string> = {
  'x86_64-unknown-linux-gnu': 'linux-x64-gnu',
  'aarch64-unknown-linux-gnu': 'linux-arm64-gnu',
  'x86_64-unknown-linux-musl': 'linux-x64-musl',
  'aarch64-unknown-linux-musl': 'linux-arm64-musl',
}

test('SUPPORTED_PLATFORMS are the napi targets of package.json', async (t) => {
  const pkg = JSON.parse(await readFile(new URL('../package.json', import.meta.url), 'utf8')) as {
    napi: { targets: string[] }
  }
  t.deepEqual(
    pkg.napi.targets.map((triple) => TRIPLE_TO_PLATFORM[triple] ?? triple),
    [...SUPPORTED_PLATFORMS],
  )
})

test('the platform detected here is the one the built addon is named after', async (t) => {
  const platform = detectPlatform()
  t.regex(platform, /^linux-(x64|arm64)-(gnu|musl)$/)
  await t.notThrowsAsync(readFile(new URL(`../native/blockfuse.${platform}.node`, import.meta.url)))
  t.is(platformPackage(platform), `blockfuse-${platform}`)
})

test('a missing platform package: the message names the platform, the package and the fix', (t) => {
  const msg = loadFailureMessage(
    { platform: 'linux-arm64-musl', sourceCheckout: false, platformPackageInstalled: false },
    "Cannot find module 'blockfuse-linux-arm64-musl'",
  )
  t.regex(msg, /\(linux-arm64-musl\)/)
  t.regex(msg, /blockfuse-linux-arm64-musl/)
  t.regex(msg, /--omit=optional/)
  t.regex(msg, /npm install blockfuse-linux-arm64-musl/)
  t.notRegex(msg, /build:native/, 'no advice that only means something in a source checkout')
})

test('an unsupported platform: the message lists the supported ones', (t) => {
  const msg = loadFailureMessage(
    { platform: 'linux-riscv64-gnu', sourceCheckout: false, platformPackageInstalled: false },
    'x',
  )
  t.regex(msg, /\(linux-riscv64-gnu\)/)
  for (const p of SUPPORTED_PLATFORMS) t.true(msg.includes(p), p)
})

test('an installed platform package that does not load: its error and the fix', (t) => {
  const msg = loadFailureMessage(
    { platform: 'linux-x64-gnu', sourceCheckout: false, platformPackageInstalled: true },
    'GLIBC_2.99 not found',
  )
  t.regex(msg, /blockfuse-linux-x64-gnu/)
  t.regex(msg, /GLIBC_2\.99 not found/)
})

test('in a source checkout the advice is to build the addon', (t) => {
  const msg = loadFailureMessage(
    { platform: 'linux-x64-gnu', sourceCheckout: true, platformPackageInstalled: false },
    'Cannot find native binding',
  )
  t.regex(msg, /npm run build:native/)
})
