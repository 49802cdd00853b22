// Builds dist/: index.html plus assets/app.js (bundled with guacamole-common-js), assets/app.css and the library's license.
import { build } from 'esbuild';
import { copyFile, mkdir, readFile, rm, writeFile } from 'node:fs/promises';

const guacDir = new URL('node_modules/guacamole-common-js/', import.meta.url);
const guacPackage = JSON.parse(await readFile(new URL('package.json', guacDir), 'utf8'));
const guacLicense = new URL('LICENSE', guacDir);

const dist = new URL('dist/', import.meta.url);
const assets = new URL('assets/', dist);

await rm(dist, { recursive: true, force: true });
await mkdir(assets, { recursive: true });

await build({
    entryPoints: { app: 'src/main.js' },
    outdir: 'dist/assets',
    bundle: true,
    format: 'iife',
    target: ['es2020'],
    minify: true,
    sourcemap: false,
    legalComments: 'none',
    banner: {
        js: `/* exoagent Guacamole client. Includes guacamole-common-js ${guacPackage.version} (Apache License 2.0, see LICENSE-guacamole-common-js.txt). */`,
    },
    logLevel: 'info',
});

await build({
    entryPoints: { app: 'src/styles.css' },
    outdir: 'dist/assets',
    bundle: true,
    minify: true,
    logLevel: 'info',
});

await copyFile(guacLicense, new URL('LICENSE-guacamole-common-js.txt', assets));
await writeFile(new URL('index.html', dist), await readFile(new URL('src/index.html', import.meta.url)));
