// Uploads a file through the proxy with Node's @google-cloud/storage,
// unmodified: createWriteStream({resumable: true}), with or without chunkSize.
// Usage: node upload.js <endpoint> <bucket> <name> <file> [chunkSize]
// Prints the object metadata the client ended up with as one JSON line.
const fs = require('fs');
const {Storage, IdempotencyStrategy} = require('@google-cloud/storage');

const [endpoint, bucketName, name, file, chunk] = process.argv.slice(2);
const storage = new Storage({
  apiEndpoint: endpoint,
  projectId: 'test',
  // Without a precondition Node retries uploads only when told to.
  retryOptions: {idempotencyStrategy: IdempotencyStrategy.RetryAlways, maxRetries: 3},
});
const options = {resumable: true, metadata: {contentType: 'video/mp4', metadata: {from: 'node'}}};
if (chunk) options.chunkSize = Number(chunk);
const blob = storage.bucket(bucketName).file(name);
fs.createReadStream(file)
  .pipe(blob.createWriteStream(options))
  .on('error', (err) => {
    console.error(`upload failed: ${err.stack || err}`);
    process.exit(1);
  })
  .on('finish', () => {
    console.log(JSON.stringify(blob.metadata));
  });
