// Uppy's Dashboard with @uppy/tus against this service's tus endpoint.
// window.uppyDemo.result holds the outcome of the last upload (tests read it).
const endpoint = document.querySelector('meta[name="tus-endpoint"]').content;
const status = document.getElementById("status");
document.getElementById("endpoint").textContent = endpoint;
window.uppyDemo = { result: null };

try {
  const { Uppy, Dashboard, Tus } = await import("/demo/uppy/vendor/uppy.min.mjs");
  const uppy = new Uppy({ autoProceed: false })
    .use(Dashboard, {
      inline: true, target: "#dashboard", height: 420, width: "100%",
      showProgressDetails: true, proudlyDisplayPoweredByUppy: false,
    })
    .use(Tus, {
      endpoint, chunkSize: 5 * 1024 * 1024, retryDelays: [0, 1000, 3000, 5000],
      removeFingerprintOnSuccess: true,
    });
  uppy.on("complete", (result) => {
    const files = (list) => list.map((file) => ({
      name: file.name, size: file.size, uploadURL: file.uploadURL ?? file.response?.uploadURL ?? null,
      error: file.error ? String(file.error) : null,
    }));
    window.uppyDemo.result = { successful: files(result.successful), failed: files(result.failed) };
    status.textContent = `${result.successful.length} uploaded, ${result.failed.length} failed`;
  });
  window.uppyDemo.uppy = uppy;
} catch (error) {
  status.textContent = "Uppy is not installed next to the service: run " +
    "'npm install --no-save uppy@6' in the directory it runs in, then reload. " + `(${error})`;
}
