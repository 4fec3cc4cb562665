// Recognize and StreamingRecognize against an asr server with @grpc/grpc-js, a client
// written by others: usage `node client.mjs HOST:PORT PROTO_DIR AUDIO.flac AUDIO.pcm`.
// Prints one JSON line: {"recognize": TEXT, "stream_finals": [TEXT...], "interim": N}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [target, protoDir, flacPath, pcmPath] = process.argv.slice(2);
const definition = protoLoader.loadSync(join(protoDir, "asr/v1/asr.proto"), {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const api = grpc.loadPackageDefinition(definition).asr.v1;
const client = new api.Recognizer(target, grpc.credentials.createInsecure());

function recognize() {
  return new Promise((resolve, reject) => {
    client.Recognize(
      { config: { enable_word_time_offsets: true }, audio: readFileSync(flacPath) },
      (err, response) => (err ? reject(err) : resolve(response)),
    );
  });
}

function stream() {
  return new Promise((resolve, reject) => {
    const finals = [];
    let interim = 0;
    const call = client.StreamingRecognize();
    call.on("data", (response) => {
      for (const result of response.results) {
        const text = result.alternatives.length ? result.alternatives[0].transcript : "";
        if (result.is_final) finals.push(text);
        else interim += 1;
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve({ finals, interim }));
    call.write({
      streaming_config: {
        config: { encoding: "LINEAR16", sample_rate_hertz: 16000 },
        interim_results: true,
      },
      request_id: "node-1",
    });
    const pcm = readFileSync(pcmPath);
    for (let at = 0; at < pcm.length; at += 3200) {
      call.write({ audio_content: pcm.subarray(at, at + 3200) });
    }
    call.end();
  });
}

try {
  const unary = await recognize();
  const streamed = await stream();
  console.log(
    JSON.stringify({
      recognize: unary.results.map((r) => r.alternatives[0].transcript).join(" "),
      words: unary.results.length ? unary.results[0].alternatives[0].words.length : 0,
      stream_finals: streamed.finals,
      interim: streamed.interim,
    }),
  );
  client.close();
} catch (err) {
  console.error(`${err.code}: ${err.details || err.message}`);
  process.exit(1);
}
