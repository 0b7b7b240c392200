/**
 * Process-wide registry of the mountpoints this process exports, keyed by absolute real path. It
 * lives on `globalThis` so that two copies of this module in one process (e.g. dist/ and ts/)
 * still see each other's exports.
 *
 * @module
 */

const KEY = Symbol.for('blockfuse.mountpoints')

function registry(): Set<string> {
  const global = globalThis as { [KEY]?: Set<string> }
  global[KEY] ??= new Set<string>()
  return global[KEY]
}

/** True when this process exports (or is mounting) an export on `path`. */
export function isExported(path: string): boolean {
  return registry().has(path)
}

/**
 * Claims `path` for a new export. Returns false if it is already claimed; the check and the claim
 * are one synchronous step, so two concurrent `create()` calls cannot both win.
 */
export function claim(path: string): boolean {
  const set = registry()
  if (set.has(path)) return false
  set.add(path)
  return true
}

/** Releases a claim made by {@link claim}. */
export function release(path: string): void {
  registry().delete(path)
}
