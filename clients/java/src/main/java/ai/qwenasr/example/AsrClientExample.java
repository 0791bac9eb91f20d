package ai.qwenasr.example;

import ai.qwenasr.v1.AsrServiceGrpc;
import ai.qwenasr.v1.AudioEncoding;
import ai.qwenasr.v1.AudioFormat;
import ai.qwenasr.v1.RecognitionConfig;
import ai.qwenasr.v1.TranscribeRequest;
import ai.qwenasr.v1.TranscribeResponse;
import ai.qwenasr.v1.TranscribeStreamRequest;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import com.google.protobuf.util.JsonFormat;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.stub.StreamObserver;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

/**
 * Example Java client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
 * Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
 *
 * <pre>java -cp "$(cat build/classpath)" ai.qwenasr.example.AsrClientExample [--target host:port] [--language L] FILE.wav</pre>
 */
public final class AsrClientExample {
  /** The 16-bit PCM samples of a WAV file with its sample rate and channel count. */
  record Wav(byte[] pcm, int sampleRate, int channels) {
    static Wav parse(byte[] data) {
      ByteBuffer buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
      if (data.length < 12 || !new String(data, 0, 4).equals("RIFF") || !new String(data, 8, 4).equals("WAVE")) {
        throw new IllegalArgumentException("not a RIFF/WAVE file");
      }
      int rate = 0;
      int channels = 0;
      for (int pos = 12; pos + 8 <= data.length; ) {
        String id = new String(data, pos, 4);
        int size = buf.getInt(pos + 4);
        if (id.equals("fmt ")) {
          if (buf.getShort(pos + 8) != 1 || buf.getShort(pos + 22) != 16) {
            throw new IllegalArgumentException("only 16-bit PCM WAV is supported");
          }
          channels = buf.getShort(pos + 10);
          rate = buf.getInt(pos + 12);
        } else if (id.equals("data")) {
          return new Wav(Arrays.copyOfRange(data, pos + 8, Math.min(pos + 8 + size, data.length)), rate, channels);
        }
        pos += 8 + size + (size % 2);
      }
      throw new IllegalArgumentException("no data chunk");
    }
  }

  public static void main(String[] args) throws Exception {
    String target = "localhost:50051";
    String language = "";
    String file = null;
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--target" -> target = args[++i];
        case "--language" -> language = args[++i];
        default -> file = args[i];
      }
    }
    if (file == null) {
      System.err.println("usage: AsrClientExample [--target host:port] [--language L] FILE.wav");
      System.exit(2);
    }
    byte[] wavBytes = Files.readAllBytes(Path.of(file));
    Wav wav = Wav.parse(wavBytes);

    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    try {
      String health = HealthGrpc.newBlockingStub(channel).withDeadlineAfter(60, TimeUnit.SECONDS)
          .check(HealthCheckRequest.getDefaultInstance()).getStatus().name();

      // Unary: the whole file in one message; the server reads the format from the WAV header.
      TranscribeResponse unary = AsrServiceGrpc.newBlockingStub(channel).withDeadlineAfter(60, TimeUnit.SECONDS)
          .transcribe(TranscribeRequest.newBuilder()
              .setConfig(RecognitionConfig.newBuilder().setLanguage(language))
              .setAudio(ByteString.copyFrom(wavBytes))
              .build());

      // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames.
      CompletableFuture<TranscribeResponse> result = new CompletableFuture<>();
      StreamObserver<TranscribeStreamRequest> upload = AsrServiceGrpc.newStub(channel)
          .withDeadlineAfter(60, TimeUnit.SECONDS)
          .transcribeStream(new StreamObserver<>() {
            @Override public void onNext(TranscribeResponse response) { result.complete(response); }
            @Override public void onError(Throwable error) { result.completeExceptionally(error); }
            @Override public void onCompleted() { }
          });
      upload.onNext(TranscribeStreamRequest.newBuilder().setConfig(RecognitionConfig.newBuilder()
          .setLanguage(language)
          .setAudioFormat(AudioFormat.newBuilder()
              .setEncoding(AudioEncoding.AUDIO_ENCODING_LINEAR16)
              .setSampleRateHz(wav.sampleRate())
              .setChannelCount(wav.channels())))
          .build());
      int frameBytes = wav.sampleRate() / 50 * wav.channels() * 2;
      for (int pos = 0; pos < wav.pcm().length; pos += frameBytes) {
        int size = Math.min(frameBytes, wav.pcm().length - pos);
        upload.onNext(TranscribeStreamRequest.newBuilder()
            .setAudio(ByteString.copyFrom(wav.pcm(), pos, size)).build());
      }
      upload.onCompleted();
      TranscribeResponse streamed = result.get(60, TimeUnit.SECONDS);

      JsonFormat.Printer printer = JsonFormat.printer().omittingInsignificantWhitespace();
      JsonObject out = new JsonObject();
      out.addProperty("health", health);
      out.add("unary", JsonParser.parseString(printer.print(unary)));
      out.add("stream", JsonParser.parseString(printer.print(streamed)));
      System.out.println(out);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
