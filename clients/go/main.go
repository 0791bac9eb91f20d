// Example Go client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//	asr-client-go [-target localhost:50051] [-language English] speech.wav
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/golang/protobuf/jsonpb"
	asrv1 "github.com/qwenasr/asr-server/gen/go/qwenasr/v1"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// wavPCM returns the 16-bit PCM samples of a WAV file with its sample rate and channel count.
func wavPCM(data []byte) (pcm []byte, rate, channels uint32, err error) {
	if len(data) < 12 || string(data[0:4]) != "RIFF" || string(data[8:12]) != "WAVE" {
		return nil, 0, 0, errors.New("not a RIFF/WAVE file")
	}
	for pos := 12; pos+8 <= len(data); {
		id, size := string(data[pos:pos+4]), int(binary.LittleEndian.Uint32(data[pos+4:pos+8]))
		body := data[pos+8 : min(pos+8+size, len(data))]
		switch id {
		case "fmt ":
			if binary.LittleEndian.Uint16(body[0:2]) != 1 || binary.LittleEndian.Uint16(body[14:16]) != 16 {
				return nil, 0, 0, errors.New("only 16-bit PCM WAV is supported")
			}
			channels = uint32(binary.LittleEndian.Uint16(body[2:4]))
			rate = binary.LittleEndian.Uint32(body[4:8])
		case "data":
			return body, rate, channels, nil
		}
		pos += 8 + size + size%2
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
	target := flag.String("target", "localhost:50051", "server address")
	language := flag.String("language", "", "language name or code; empty: detect")
	flag.Parse()
	if flag.NArg() != 1 {
		log.Fatal("usage: asr-client-go [-target host:port] [-language L] FILE.wav")
	}
	wav, err := os.ReadFile(flag.Arg(0))
	if err != nil {
		log.Fatal(err)
	}
	pcm, rate, channels, err := wavPCM(wav)
	if err != nil {
		log.Fatal(err)
	}

	conn, err := grpc.Dial(*target, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithTimeout(10*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	health, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		log.Fatalf("health: %v", err)
	}
	client := asrv1.NewAsrServiceClient(conn)

	// Unary: the whole file in one message; the server reads the format from the WAV header.
	unary, err := client.Transcribe(ctx, &asrv1.TranscribeRequest{
		Config: &asrv1.RecognitionConfig{Language: *language},
		Audio:  wav,
	})
	if err != nil {
		log.Fatalf("Transcribe: %v", err)
	}

	// Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames.
	stream, err := client.TranscribeStream(ctx)
	if err != nil {
		log.Fatalf("TranscribeStream: %v", err)
	}
	config := &asrv1.RecognitionConfig{
		Language: *language,
		AudioFormat: &asrv1.AudioFormat{
			Encoding: asrv1.AudioEncoding_AUDIO_ENCODING_LINEAR16, SampleRateHz: rate, ChannelCount: channels,
		},
	}
	if err := stream.Send(&asrv1.TranscribeStreamRequest{Payload: &asrv1.TranscribeStreamRequest_Config{Config: config}}); err != nil {
		log.Fatalf("send config: %v", err)
	}
	frame := int(rate/50) * int(channels) * 2
	for pos := 0; pos < len(pcm); pos += frame {
		piece := pcm[pos:min(pos+frame, len(pcm))]
		if err := stream.Send(&asrv1.TranscribeStreamRequest{Payload: &asrv1.TranscribeStreamRequest_Audio{Audio: piece}}); err != nil {
			log.Fatalf("send audio: %v", err)
		}
	}
	streamed, err := stream.CloseAndRecv()
	if err != nil {
		log.Fatalf("TranscribeStream: %v", err)
	}

	asJSON := func(m *asrv1.TranscribeResponse) json.RawMessage {
		out, err := (&jsonpb.Marshaler{}).MarshalToString(m)
		if err != nil {
			log.Fatal(err)
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
