/** Running real programs (clients of an export, the CLI) and capturing what they did. */
import { spawn, spawnSync, type SpawnOptions } from 'node:child_process'

export interface RunResult {
  /** Exit code, or null when killed by a signal. */
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

/** Runs `cmd args` to completion; never rejects for a non-zero exit (only if it cannot start). */
export function run(
  cmd: string,
  args: readonly string[],
  options: SpawnOptions & { input?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const input = options.input
    const child = spawn(cmd, args, { ...options, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.on('error', (err) => reject(new Error(`cannot run ${cmd}: ${err.message}`)))
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }))
    if (input !== undefined) {
      // A child that exits without reading its input is not an error of ours.
      child.stdin!.on('error', () => {})
      child.stdin!.end(input)
    }
  })
}

/** Runs `cmd args` and throws (with its stderr) unless it exits 0. */
export async function mustRun(cmd: string, args: readonly string[], options: SpawnOptions = {}): Promise<RunResult> {
  const result = await run(cmd, args, options)
  if (result.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(' ')} exited ${result.code ?? result.signal}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`,
    )
  }
  return result
}

/** True when `tool` is on PATH. */
export function hasTool(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }).status === 0
}
