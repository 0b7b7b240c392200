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
