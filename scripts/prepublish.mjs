/**
 * `prepublishOnly` of the main package (the release job's `npm publish`): runs `napi prepublish -t
 * npm`, which publishes the platform packages in npm/<platform>/ and adds them to package.json as
 * optionalDependencies, then removes `scripts.prepare` from package.json, so that the published
 * manifest runs nothing at install time (npm re-reads package.json after prepublishOnly, and packs
 * and publishes what it finds then). The release job has built everything before (`npm ci`).
 *
 * It edits package.json in place, as `napi prepublish` does: run it on a release checkout only.
 */
import { spawnSync } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'

const manifestPath = new URL('../package.json', import.meta.url)

const napi = spawnSync('npx', ['--no', '--', 'napi', 'prepublish', '-t', 'npm'], { stdio: 'inherit' })
if (napi.status !== 0) {
  console.error(`prepublish: napi prepublish failed (${napi.error?.message ?? `exit ${napi.status}`})`)
  process.exit(1)
}

const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'))
if (manifest.scripts?.prepare !== undefined) {
  delete manifest.scripts.prepare
  writeFileSync(manifestPath, `${JSON.stringify(manifest, null, 2)}\n`)
  console.log('prepublish: removed scripts.prepare from the manifest to publish (it builds from source)')
}
