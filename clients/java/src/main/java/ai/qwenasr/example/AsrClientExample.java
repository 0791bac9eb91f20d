package ai.qwenasr.example;

import ai.qwenasr.v1.AsrServiceGrpc;
import ai.qwenasr.v1.AudioEncoding;
import ai.qwenasr.v1.AudioFormat;
import ai.qwenasr.v1.RecognitionConfig;
import ai.qwenasr.v1.TranscribeRequest;
import ai.qwenasr.v1.TranscribeResponse;
import ai.qwenasr.v1.TranscribeStreamRequest;
import com.google.gson.Gson;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import com.google.protobuf.util.JsonFormat;
import io.grpc.Channel;
import io.grpc.ClientInterceptors;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

/**
 * Example Java client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
 * Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
 *
 * <pre>java -cp "$(cat build/classpath)" ai.qwenasr.example.AsrClientExample [--target host:port] [--language L]
 *     [--token TOKEN] FILE.wav</pre>
 *
 * <p>Exit status: 0 on success, 1 for a usage or file error, 2 when a call fails (one line on stderr names the gRPC
 * status code and the server's message).
 */
public final class AsrClientExample {
  /**
   * gRPC's own retry policy (gRFC A6), the same in every client of this repository: a call that fails UNAVAILABLE
   * (a server restarting, a connection refused) or RESOURCE_EXHAUSTED (a full queue) is sent again, at most 4
   * attempts in all, after jittered exponential backoff from 0.2 s (at most 2 s). The server's
   * "grpc-retry-pushback-ms" trailer overrides the backoff (its RetryInfo delay) or stops the retries (-1: audio over
   * a limit, which no retry cures). A call is retried only until its first response header arrives, and a client
   * stream only while gRPC still holds what was sent (its retry buffer). StreamingRecognize is left out: live audio
   * is not replayed.
   */
  static final String RETRY_SERVICE_CONFIG = "{\"methodConfig\": [{"
      + "\"name\": [{\"service\": \"qwenasr.v1.AsrService\", \"method\": \"Transcribe\"},"
      + " {\"service\": \"qwenasr.v1.AsrService\", \"method\": \"TranscribeStream\"},"
      + " {\"service\": \"qwenasr.v1.AsrService\", \"method\": \"Align\"},"
      + " {\"service\": \"qwenasr.v1.AsrService\", \"method\": \"GetServerInfo\"},"
      + " {\"service\": \"grpc.health.v1.Health\", \"method\": \"Check\"}],"
      + " \"retryPolicy\": {\"maxAttempts\": 4, \"initialBackoff\": \"0.2s\", \"maxBackoff\": \"2s\","
      + " \"backoffMultiplier\": 2, \"retryableStatusCodes\": [\"UNAVAILABLE\", \"RESOURCE_EXHAUSTED\"]}}]}";

  /** The service config as grpc-java takes it: nested maps and lists, numbers as Double (what Gson makes). */
  @SuppressWarnings("unchecked")
  static Map<String, ?> retryServiceConfig() {
    return new Gson().fromJson(RETRY_SERVICE_CONFIG, Map.class);
  }

  private static final String USAGE =
      "usage: AsrClientExample [--target host:port] [--language L] [--token TOKEN] FILE.wav";

  /** A usage, file or WAV error: exit status 1. */
  static final class UsageException extends Exception {
    UsageException(String message) {
      super(message);
    }
  }

  /** The last 14 bytes of the KSDATAFORMAT_SUBTYPE_* GUIDs; the first two are the format tag (1: PCM). */
  private static final byte[] SUBTYPE_GUID_TAIL = {
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, (byte) 0x80, 0x00, 0x00, (byte) 0xAA, 0x00, 0x38, (byte) 0x9B, 0x71
  };

  /** The 16-bit PCM samples of a WAV file with its sample rate and channel count. */
  record Wav(byte[] pcm, int sampleRate, int channels) {
    /**
     * Checks every length against the file's, so a short or malformed file is a UsageException. A data chunk that
     * claims more bytes than the file has (as streamed recordings do) is read to the end of the file.
     */
    static Wav parse(byte[] data) throws UsageException {
      ByteBuffer buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
      if (data.length < 12 || !ascii(data, 0).equals("RIFF") || !ascii(data, 8).equals("WAVE")) {
        throw new UsageException("not a RIFF/WAVE file");
      }
      long rate = 0;
      int channels = 0;
      boolean haveFmt = false;
      for (long pos = 12; pos + 8 <= data.length; ) {
        int at = (int) pos;
        String id = ascii(data, at);
        long size = Integer.toUnsignedLong(buf.getInt(at + 4));
        long end = pos + 8 + size;
        if (id.equals("fmt ")) {
          if (end > data.length) {
            throw new UsageException("the fmt chunk (" + size + " bytes) runs past the end of the file");
          }
          if (size < 16) {
            throw new UsageException("the fmt chunk is " + size + " bytes, under 16");
          }
          int tag = Short.toUnsignedInt(buf.getShort(at + 8));
          channels = Short.toUnsignedInt(buf.getShort(at + 10));
          rate = Integer.toUnsignedLong(buf.getInt(at + 12));
          int bits = Short.toUnsignedInt(buf.getShort(at + 22));
          if (tag == 0xFFFE) { // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two bytes
            if (size < 40) {
              throw new UsageException("the WAVE_FORMAT_EXTENSIBLE fmt chunk is " + size + " bytes, under 40");
            }
            boolean known = Arrays.equals(Arrays.copyOfRange(data, at + 34, at + 48), SUBTYPE_GUID_TAIL);
            tag = known ? Short.toUnsignedInt(buf.getShort(at + 32)) : 0;
          }
          if (tag != 1 || bits != 16) {
            throw new UsageException(
                "only 16-bit PCM WAV is supported (format 0x" + Integer.toHexString(tag) + ", " + bits + " bits)");
          }
          if (channels == 0 || rate == 0 || rate > Integer.MAX_VALUE) {
            throw new UsageException("the fmt chunk says " + channels + " channels at " + rate + " Hz");
          }
          haveFmt = true;
        } else if (id.equals("data")) {
          if (!haveFmt) {
            throw new UsageException("the data chunk comes before the fmt chunk");
          }
          long available = Math.min(end, data.length) - (pos + 8);
          int length = (int) (available - available % (channels * 2L));
          return new Wav(Arrays.copyOfRange(data, at + 8, at + 8 + length), (int) rate, channels);
        }
        pos = end + size % 2;
      }
      throw new UsageException(haveFmt ? "no data chunk" : "no fmt chunk");
    }

    private static String ascii(byte[] data, int pos) {
      return new String(data, pos, 4, StandardCharsets.ISO_8859_1);
    }
  }

  public static void main(String[] args) {
    try {
      System.exit(run(args));
    } catch (UsageException e) {
      fail(1, e.getMessage());
    } catch (IOException e) {
      fail(1, e.toString());
    } catch (Exception e) {
      fail(1, "unexpected error: " + e);
    }
  }

  /** Prints one line on stderr and exits with code. */
  private static void fail(int code, String message) {
    System.err.println("asr-client-java: " + message.replace('\n', ' '));
    System.exit(code);
  }

  /** The gRPC status in throwable or its causes (StatusRuntimeException, StatusException), or null. */
  private static Status statusOf(Throwable throwable) {
    for (Throwable t = throwable; t != null; t = t.getCause()) {
      if (t instanceof StatusRuntimeException e) {
        return e.getStatus();
      }
      if (t instanceof StatusException e) {
        return e.getStatus();
      }
    }
    return null;
  }

  /** Reports a failed call as "CALL failed: CODE: server's message" and exits with 2 (1 if it is no RPC error). */
  private static void failRpc(String call, Throwable error) {
    Status status = statusOf(error);
    if (status == null) {
      fail(1, call + " failed: " + error);
    } else {
      String description = status.getDescription() == null ? "" : status.getDescription();
      if (status.getCause() != null) { // a local failure (no connection, ...): say what it was
        description += " (" + status.getCause() + ")";
      }
      fail(2, call + " failed: " + status.getCode().name() + ": " + description);
    }
  }

  private static int run(String[] args) throws Exception {
    String target = "localhost:50051";
    String language = "";
    String token = System.getenv().getOrDefault("ASR_TOKEN", "");
    String file = null;
    for (int i = 0; i < args.length; i++) {
      String arg = args[i];
      if (arg.equals("--target") || arg.equals("--language") || arg.equals("--token")) {
        if (i + 1 == args.length) {
          throw new UsageException(arg + " needs a value; " + USAGE);
        }
        String value = args[++i];
        switch (arg) {
          case "--target" -> target = value;
          case "--language" -> language = value;
          default -> token = value;
        }
      } else if (arg.equals("-h") || arg.equals("--help")) {
        System.out.println(USAGE);
        return 0;
      } else if (arg.startsWith("-") || file != null) {
        throw new UsageException("unexpected argument " + arg + "; " + USAGE);
      } else {
        file = arg;
      }
    }
    if (file == null) {
      throw new UsageException(USAGE);
    }
    byte[] wavBytes;
    try {
      wavBytes = Files.readAllBytes(Path.of(file));
    } catch (IOException | java.nio.file.InvalidPathException e) {
      throw new UsageException("cannot read " + file + ": " + e);
    }
    Wav wav;
    try {
      wav = Wav.parse(wavBytes);
    } catch (UsageException e) {
      throw new UsageException(file + ": not a usable WAV file: " + e.getMessage());
    }

    ManagedChannel managed = ManagedChannelBuilder.forTarget(target).usePlaintext()
        .defaultServiceConfig(retryServiceConfig()).enableRetry().build();
    try {
      Channel channel = managed;
      if (!token.isEmpty()) { // "authorization: Bearer TOKEN" on every call
        Metadata headers = new Metadata();
        headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
        channel = ClientInterceptors.intercept(managed, MetadataUtils.newAttachHeadersInterceptor(headers));
      }

      String health;
      try {
        health = HealthGrpc.newBlockingStub(channel).withDeadlineAfter(60, TimeUnit.SECONDS)
            .check(HealthCheckRequest.getDefaultInstance()).getStatus().name();
      } catch (StatusRuntimeException e) {
        failRpc("health check", e);
        return 2;
      }

      // Unary: the whole file in one message; the server reads the format from the WAV header.
      TranscribeResponse unary;
      try {
        unary = AsrServiceGrpc.newBlockingStub(channel).withDeadlineAfter(60, TimeUnit.SECONDS)
            .transcribe(TranscribeRequest.newBuilder()
                .setConfig(RecognitionConfig.newBuilder().setLanguage(language))
                .setAudio(ByteString.copyFrom(wavBytes))
                .build());
      } catch (StatusRuntimeException e) {
        failRpc("Transcribe", e);
        return 2;
      }

      // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames. If the server ends the call
      // early, what is still sent is dropped and onError carries the server's status.
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
      int frameBytes = Math.max(wav.sampleRate() / 50, 1) * wav.channels() * 2;
      for (int pos = 0; pos < wav.pcm().length && !result.isDone(); pos += frameBytes) {
        int size = Math.min(frameBytes, wav.pcm().length - pos);
        upload.onNext(TranscribeStreamRequest.newBuilder()
            .setAudio(ByteString.copyFrom(wav.pcm(), pos, size)).build());
      }
      upload.onCompleted();
      TranscribeResponse streamed;
      try {
        streamed = result.get(70, TimeUnit.SECONDS);
      } catch (java.util.concurrent.ExecutionException e) {
        failRpc("TranscribeStream", e.getCause());
        return 2;
      }

      JsonFormat.Printer printer = JsonFormat.printer().omittingInsignificantWhitespace();
      JsonObject out = new JsonObject();
      out.addProperty("health", health);
      out.add("unary", JsonParser.parseString(printer.print(unary)));
      out.add("stream", JsonParser.parseString(printer.print(streamed)));
      System.out.println(out);
      return 0;
    } finally {
      managed.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
