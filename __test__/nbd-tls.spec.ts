/**
 * Issue 18, NBD over TLS: a CA, server and client certificates made with openssl for each run;
 * nbdkit with `--tls=require` (and `--tls-verify-peer`) on 127.0.0.1 and a Unix socket. The
 * export serves over `nbds://` / `nbds+unix://` when the server's certificate checks out against
 * the given CA and name, and `create` fails with NBD_TLS_FAILED when it does not, when the server
 * requires TLS of a plain `nbd://` client, or when it requires a client certificate.
 */
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { MiB, makeImage, makeMountpoint, tempDir } from './helpers/files.js'
import { freePort, nbdkit, type Listen } from './helpers/nbd.js'
import { mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['nbdkit', 'openssl', 'dd', 'findmnt'])
})

interface Pki {
  dir: string
  /** nbdkit's --tls-certificates directory: ca-cert.pem, server-cert.pem, server-key.pem. */
  serverDir: string
  ca: string
  otherCa: string
  clientCert: string
  clientKey: string
}

async function openssl(...args: string[]): Promise<void> {
  await mustClient('openssl', args)
}

/** A CA that signs a server certificate (localhost, 127.0.0.1) and a client certificate, plus an unrelated CA. */
async function makePki(t: ExecutionContext): Promise<Pki> {
  const dir = await tempDir(t)
  const serverDir = join(dir, 'server')
  await mustClient('mkdir', [serverDir])
  const p = (name: string) => join(dir, name)
  const ca = join(serverDir, 'ca-cert.pem')
  await openssl(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    p('ca-key.pem'),
    '-out',
    ca,
    '-days',
    '2',
    '-subj',
    '/CN=blockfuse test CA',
  )
  await openssl(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    p('other-key.pem'),
    '-out',
    p('other-ca.pem'),
    '-days',
    '2',
    '-subj',
    '/CN=another CA',
  )
  await writeFile(p('server.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n')
  await writeFile(p('client.ext'), 'extendedKeyUsage=clientAuth\n')
  for (const [name, ext, out] of [
    ['server', 'server.ext', serverDir],
    ['client', 'client.ext', dir],
  ] as const) {
    const key = join(out, `${name}-key.pem`)
    await openssl(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      key,
      '-out',
      p(`${name}.csr`),
      '-subj',
      `/CN=${name === 'server' ? 'localhost' : 'blockfuse client'}`,
    )
    await openssl(
      'x509',
      '-req',
      '-in',
      p(`${name}.csr`),
      '-CA',
      ca,
      '-CAkey',
      p('ca-key.pem'),
      '-CAcreateserial',
      '-out',
      join(out, `${name}-cert.pem`),
      '-days',
      '2',
      '-extfile',
      p(ext),
    )
  }
  return {
    dir,
    serverDir,
    ca,
    otherCa: p('other-ca.pem'),
    clientCert: join(dir, 'client-cert.pem'),
    clientKey: join(dir, 'client-key.pem'),
  }
}

async function mountpointIn(t: ExecutionContext): Promise<string> {
  const mnt = join(await tempDir(t), 'mnt')
  await makeMountpoint(mnt)
  return mnt
}

for (const kind of ['tcp', 'unix'] as const) {
  test(`nbds over ${kind === 'tcp' ? '127.0.0.1' : 'a Unix socket (server name localhost)'}: data written reads back through TLS`, async (t) => {
    const pki = await makePki(t)
    const listen: Listen =
      kind === 'tcp' ? { kind, port: await freePort() } : { kind, socket: join(pki.dir, 'tls.sock') }
    const server = await nbdkit(t, listen, ['memory', '16M'], { tls: 'require', certDir: pki.serverDir })
    t.regex(server.uri, /^nbds/)
    const mountpoint = await mountpointIn(t)
    await openExport(t, { source: server.uri, mountpoint, writable: true, nbd: { tlsCa: pki.ca } })
    const data = await makeImage(join(pki.dir, 'data'), 3 * MiB)
    await mustClient('dd', [
      `if=${join(pki.dir, 'data')}`,
      `of=${mountpoint}`,
      'bs=256k',
      'oflag=direct',
      'conv=notrunc,fsync',
      'status=none',
    ])
    t.true((await readFile(mountpoint)).subarray(0, data.length).equals(data))
  })
}

test('the server certificate is checked: another CA or another name fails with NBD_TLS_FAILED', async (t) => {
  const pki = await makePki(t)
  const server = await nbdkit(t, { kind: 'tcp', port: await freePort() }, ['memory', '1M'], {
    tls: 'require',
    certDir: pki.serverDir,
  })
  const mountpoint = await mountpointIn(t)
  await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint, nbd: { tlsCa: pki.otherCa } }), {
    code: 'NBD_TLS_FAILED',
  })
  await t.throwsAsync(
    FuseExport.create({ source: server.uri, mountpoint, nbd: { tlsCa: pki.ca, tlsServerName: 'disk.example.com' } }),
    { code: 'NBD_TLS_FAILED' },
  )
  // A plain client of a server that requires TLS is told so.
  await t.throwsAsync(FuseExport.create({ source: server.uri.replace('nbds://', 'nbd://'), mountpoint }), {
    code: 'NBD_TLS_FAILED',
    message: /requires TLS/,
  })
  // TLS options without TLS are a mistake worth reporting.
  await t.throwsAsync(
    FuseExport.create({ source: server.uri.replace('nbds://', 'nbd://'), mountpoint, nbd: { tlsCa: pki.ca } }),
    { code: 'NBD_TLS_FAILED' },
  )
})

test('a server that verifies clients accepts our certificate and key, and refuses us without them', async (t) => {
  const pki = await makePki(t)
  const server = await nbdkit(t, { kind: 'tcp', port: await freePort() }, ['memory', '1M'], {
    tls: 'require',
    certDir: pki.serverDir,
    verifyPeer: true,
  })
  const mountpoint = await mountpointIn(t)
  await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint, nbd: { tlsCa: pki.ca } }), {
    code: 'NBD_TLS_FAILED',
  })
  const exp = await openExport(t, {
    source: server.uri,
    mountpoint,
    nbd: { tlsCa: pki.ca, tlsCert: pki.clientCert, tlsKey: pki.clientKey },
  })
  t.is(exp.size, MiB)
  t.is((await readFile(mountpoint)).length, MiB)
})
