// Detects the audio, video and image mimetypes this browser can handle, for the connect data.
import Guacamole from 'guacamole-common-js';

/** A 1×1 lossless WebP, decoded to test WebP support (same test as the stock app). */
const WEBP_PROBE = 'data:image/webp;base64,UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==';

let imageTypes = null;

/**
 * @returns {Promise<string[]>} image mimetypes, PNG and JPEG always, WebP when it decodes
 */
export function supportedImageTypes() {
    if (!imageTypes) {
        imageTypes = new Promise((resolve) => {
            const types = ['image/jpeg', 'image/png'];
            const img = new Image();
            const done = (ok) => resolve(ok ? [...types, 'image/webp'] : types);
            const timer = setTimeout(() => done(false), 1000);
            img.onload = () => { clearTimeout(timer); done(img.width === 1 && img.height === 1); };
            img.onerror = () => { clearTimeout(timer); done(false); };
            img.src = WEBP_PROBE;
        });
    }
    return imageTypes;
}

/** @returns {string[]} e.g. ["audio/L8", "audio/L16"] */
export function supportedAudioTypes() {
    try {
        return Guacamole.AudioPlayer.getSupportedTypes();
    } catch {
        return [];
    }
}

/** @returns {string[]} (guacamole-common-js 1.5 has no built-in video player: empty) */
export function supportedVideoTypes() {
    try {
        return Guacamole.VideoPlayer.getSupportedTypes();
    } catch {
        return [];
    }
}

/** Resumes the shared AudioContext on the first user gesture (browsers start it suspended). */
export function resumeAudioOnGesture() {
    const resume = () => {
        const context = Guacamole.AudioContextFactory.getAudioContext();
        if (context && context.state === 'suspended')
            context.resume().catch(() => {});
    };
    for (const type of ['pointerdown', 'keydown', 'touchstart'])
        document.addEventListener(type, resume, { capture: true, passive: true });
}
