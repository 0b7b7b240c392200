/** fio's JSON report, as the specs that run fio read it. */

export interface FioJob {
  jobname: string
  error: number
  read: { io_bytes: number; total_ios: number }
  write: { io_bytes: number; total_ios: number }
}

/** Parses fio's JSON report; fio may print warnings before it (e.g. about several writers on one file). */
export function parseFioReport(text: string): { jobs: FioJob[] } {
  const start = text.search(/^\{/m)
  if (start < 0) throw new Error(`fio wrote no JSON report:\n${text}`)
  return JSON.parse(text.slice(start)) as { jobs: FioJob[] }
}

/**
 * fio's arguments for the specs' write-then-verify load: `jobs` jobs of 4 KiB O_DIRECT random
 * writes at depth 16 (libaio), job i on its own `size` bytes from `i * offsetIncrement` (default
 * `size`), each verified with crc32c after writing; a JSON report to `output`.
 */
export function fioVerifyArgs(o: {
  filename: string
  jobs: number
  size: number
  offsetIncrement?: number
  output: string
}): string[] {
  return [
    '--name=verify',
    `--filename=${o.filename}`,
    '--rw=randwrite',
    '--bs=4k',
    '--direct=1',
    '--ioengine=libaio',
    '--iodepth=16',
    `--numjobs=${o.jobs}`,
    `--size=${o.size}`,
    `--offset_increment=${o.offsetIncrement ?? o.size}`,
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0',
    '--output-format=json',
    `--output=${o.output}`,
  ]
}
