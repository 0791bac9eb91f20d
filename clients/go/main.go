// Example Go client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//	asr-client-go [--target localhost:50051] [--language English] [--token TOKEN] [--ca-file CA.pem] speech.wav
//
// --ca-file connects over TLS, trusting the server certificates that CA signs (plaintext without it).
//
// Exit status: 0 on success, 1 for a usage or file error, 2 when a call fails (one line on stderr names the
// gRPC status code and the server's message).
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/golang/protobuf/jsonpb"
	asrv1 "github.com/qwenasr/asr-server/gen/go/qwenasr/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// retryServiceConfig is gRPC's own retry policy (gRFC A6), the same in every client of this repository: a call
// that fails UNAVAILABLE (a server restarting, a connection refused) or RESOURCE_EXHAUSTED (a full queue) is sent
// again, at most 4 attempts in all, after jittered exponential backoff from 0.2 s (at most 2 s). The server's
// "grpc-retry-pushback-ms" trailer overrides the backoff (its RetryInfo delay) or stops the retries (-1: audio over
// a limit, which no retry cures). A call is retried only until its first response header arrives, and a client
// stream only while gRPC still holds what was sent (its retry buffer). StreamingRecognize is left out: live audio
// is not replayed.
const retryServiceConfig = `{"methodConfig": [{
  "name": [{"service": "qwenasr.v1.AsrService", "method": "Transcribe"},
           {"service": "qwenasr.v1.AsrService", "method": "TranscribeStream"},
           {"service": "qwenasr.v1.AsrService", "method": "Align"},
           {"service": "qwenasr.v1.AsrService", "method": "GetServerInfo"},
           {"service": "grpc.health.v1.Health", "method": "Check"}],
  "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}}]}`

// enableRetries makes sure grpc-go retries: before 1.40 (Debian ships 1.33) it does only with GRPC_GO_RETRY=on
// in the environment, read when the process starts, so the program runs itself again with it set. Newer grpc-go
// retries by default and ignores the variable.
func enableRetries() {
	if os.Getenv("GRPC_GO_RETRY") != "" {
		return
	}
	self, err := os.Executable()
	if err != nil {
		return // retries stay off; every call still works
	}
	env := append(os.Environ(), "GRPC_GO_RETRY=on")
	if err := syscall.Exec(self, os.Args, env); err != nil {
		fmt.Fprintf(os.Stderr, "asr-client-go: cannot enable gRPC retries: %v\n", err)
	}
}

const usage = "usage: asr-client-go [--target host:port] [--language L] [--token TOKEN] [--ca-file CA.pem] FILE.wav"

// The canonical status code names (grpc-go's codes.Code.String() says "InvalidArgument", other languages
// and the gRPC spec say INVALID_ARGUMENT).
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

// fail prints one line on stderr and exits with code.
func fail(code int, format string, args ...interface{}) {
	message := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ")
	fmt.Fprintln(os.Stderr, "asr-client-go: "+message)
	os.Exit(code)
}

// failRPC reports a failed call as "CALL failed: CODE: server's message" and exits with 2.
func failRPC(call string, err error) {
	st := status.Convert(err)
	name, ok := codeNames[st.Code()]
	if !ok {
		name = fmt.Sprintf("CODE_%d", st.Code())
	}
	fail(2, "%s failed: %s: %s", call, name, st.Message())
}

// The last 14 bytes of the KSDATAFORMAT_SUBTYPE_* GUIDs; the first two are the format tag (1: PCM).
var subtypeGUIDTail = []byte{0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71}

// wavPCM returns the 16-bit PCM samples of a WAV file with its sample rate and channel count. It checks every
// length against the file's, so a short or malformed file is an error, never a panic. A data chunk that claims
// more bytes than the file has (as streamed recordings do) is read to the end of the file.
func wavPCM(data []byte) (pcm []byte, rate, channels uint32, err error) {
	if len(data) < 12 || string(data[0:4]) != "RIFF" || string(data[8:12]) != "WAVE" {
		return nil, 0, 0, errors.New("not a RIFF/WAVE file")
	}
	haveFmt := false
	for pos := 12; pos+8 <= len(data); {
		id := string(data[pos : pos+4])
		size := int64(binary.LittleEndian.Uint32(data[pos+4 : pos+8]))
		start, end := int64(pos+8), int64(pos+8)+size
		switch id {
		case "fmt ":
			if end > int64(len(data)) {
				return nil, 0, 0, fmt.Errorf("the fmt chunk (%d bytes) runs past the end of the file", size)
			}
			body := data[start:end]
			if len(body) < 16 {
				return nil, 0, 0, fmt.Errorf("the fmt chunk is %d bytes, under 16", len(body))
			}
			tag := binary.LittleEndian.Uint16(body[0:2])
			channels = uint32(binary.LittleEndian.Uint16(body[2:4]))
			rate = binary.LittleEndian.Uint32(body[4:8])
			bits := binary.LittleEndian.Uint16(body[14:16])
			if tag == 0xFFFE { // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two bytes
				if len(body) < 40 {
					return nil, 0, 0, fmt.Errorf("the WAVE_FORMAT_EXTENSIBLE fmt chunk is %d bytes, under 40", len(body))
				}
				tag = 0
				if bytes.Equal(body[26:40], subtypeGUIDTail) {
					tag = binary.LittleEndian.Uint16(body[24:26])
				}
			}
			if tag != 1 || bits != 16 {
				return nil, 0, 0, fmt.Errorf("only 16-bit PCM WAV is supported (format %#x, %d bits)", tag, bits)
			}
			if channels == 0 || rate == 0 {
				return nil, 0, 0, fmt.Errorf("the fmt chunk says %d channels at %d Hz", channels, rate)
			}
			haveFmt = true
		case "data":
			if !haveFmt {
				return nil, 0, 0, errors.New("the data chunk comes before the fmt chunk")
			}
			if end > int64(len(data)) {
				end = int64(len(data))
			}
			body := data[start:end]
			frame := int(channels) * 2
			return body[:len(body)-len(body)%frame], rate, channels, nil
		}
		next := end + size%2
		if next > int64(len(data)) {
			break
		}
		pos = int(next)
	}
	if !haveFmt {
		return nil, 0, 0, errors.New("no fmt chunk")
	}
	return nil, 0, 0, errors.New("no data chunk")
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func main() {
	enableRetries()
	flags := flag.NewFlagSet("asr-client-go", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	target := flags.String("target", "localhost:50051", "server address")
	language := flags.String("language", "", "language name or code, sent as given; empty: detect")
	token := flags.String("token", os.Getenv("ASR_TOKEN"), "sent as 'authorization: Bearer TOKEN' (env ASR_TOKEN)")
	caFile := flags.String("ca-file", "", "TLS: trust the server certificates this CA (PEM) signs; empty: plaintext")
	if err := flags.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Println(usage)
			os.Exit(0)
		}
		fail(1, "%v; %s", err, usage)
	}
	if flags.NArg() != 1 {
		fail(1, usage)
	}
	path := flags.Arg(0)
	wav, err := os.ReadFile(path)
	if err != nil {
		fail(1, "%v", err)
	}
	pcm, rate, channels, err := wavPCM(wav)
	if err != nil {
		fail(1, "%s: not a usable WAV file: %v", path, err)
	}

	// No WithBlock: an unreachable server is then an UNAVAILABLE status of the first call, like any other.
	transport := grpc.WithInsecure()
	if *caFile != "" {
		// The certificate must name the target's host (an IP address target needs an IP SAN).
		tlsCredentials, err := credentials.NewClientTLSFromFile(*caFile, "")
		if err != nil {
			fail(1, "--ca-file %s: %v", *caFile, err)
		}
		transport = grpc.WithTransportCredentials(tlsCredentials)
	}
	conn, err := grpc.Dial(*target, transport, grpc.WithDefaultServiceConfig(retryServiceConfig))
	if err != nil {
		fail(2, "connect to %s: %v", *target, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if *token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*token)
	}

	health, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		failRPC("health check", err)
	}
	client := asrv1.NewAsrServiceClient(conn)

	// Unary: the whole file in one message; the server reads the format from the WAV header.
	unary, err := client.Transcribe(ctx, &asrv1.TranscribeRequest{
		Config: &asrv1.RecognitionConfig{Language: *language},
		Audio:  wav,
	})
	if err != nil {
		failRPC("Transcribe", err)
	}

	// Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames.
	stream, err := client.TranscribeStream(ctx)
	if err != nil {
		failRPC("TranscribeStream", err)
	}
	config := &asrv1.RecognitionConfig{
		Language: *language,
		AudioFormat: &asrv1.AudioFormat{
			Encoding: asrv1.AudioEncoding_AUDIO_ENCODING_LINEAR16, SampleRateHz: rate, ChannelCount: channels,
		},
	}
	messages := []*asrv1.TranscribeStreamRequest{{Payload: &asrv1.TranscribeStreamRequest_Config{Config: config}}}
	frame := int(rate/50) * int(channels) * 2
	if frame == 0 {
		frame = int(channels) * 2
	}
	for pos := 0; pos < len(pcm); pos += frame {
		piece := pcm[pos:min(pos+frame, len(pcm))]
		audio := &asrv1.TranscribeStreamRequest_Audio{Audio: piece}
		messages = append(messages, &asrv1.TranscribeStreamRequest{Payload: audio})
	}
	for _, message := range messages {
		if err := stream.Send(message); err != nil {
			// io.EOF: the server has ended the call (an error status, usually); CloseAndRecv below returns it.
			if err != io.EOF {
				failRPC("TranscribeStream", err)
			}
			break
		}
	}
	streamed, err := stream.CloseAndRecv()
	if err != nil {
		failRPC("TranscribeStream", err)
	}

	asJSON := func(m *asrv1.TranscribeResponse) json.RawMessage {
		out, err := (&jsonpb.Marshaler{}).MarshalToString(m)
		if err != nil {
			fail(1, "JSON: %v", err)
		}
		return json.RawMessage(out)
	}
	out, _ := json.Marshal(map[string]interface{}{
		"health": health.Status.String(),
		"unary":  asJSON(unary),
		"stream": asJSON(streamed),
	})
	fmt.Println(string(out))
}
