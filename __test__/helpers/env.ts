/**
 * The end-to-end specs need root, /dev/fuse and real client tools. A missing one is a loud
 * failure with the reason, never a skip.
 */
import { accessSync, constants, readFileSync } from 'node:fs'

import { hasTool } from './run.js'

const TOOL_PACKAGES = (
  JSON.parse(readFileSync(new URL('../../scripts/test-tools.json', import.meta.url), 'utf8')) as {
    tools: Record<string, string>
  }
).tools

/** Throws an Error naming everything the end-to-end tests need but this machine lacks. */
export function assertE2eEnvironment(tools: readonly string[]): void {
  const missing: string[] = []
  if (process.getuid?.() !== 0) missing.push('root privileges (the tests mount with mount(2))')
  try {
    accessSync('/dev/fuse', constants.R_OK | constants.W_OK)
  } catch (err) {
    missing.push(
      `/dev/fuse (${(err as Error).message}; load the fuse module / run the container with --device /dev/fuse)`,
    )
  }
  for (const tool of tools) if (!hasTool(tool)) missing.push(`the ${tool} command (apt-get install ${packageOf(tool)})`)
  if (missing.length > 0) {
    throw new Error(`end-to-end tests cannot run, this machine lacks:\n  - ${missing.join('\n  - ')}`)
  }
}

/** The Debian package of `tool`, from the map that `npm test` installs from. */
function packageOf(tool: string): string {
  return TOOL_PACKAGES[tool] ?? `the package that provides ${tool}`
}
