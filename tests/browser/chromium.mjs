// The one Chromium set-up the browser tests share: Debian's /usr/bin/chromium (installed by
// tests/browser/setup.sh), driven by playwright-core, with these flags.
export const CHROMIUM = '/usr/bin/chromium';
export const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'];
export const VIEWPORT = { width: 1280, height: 720 };
