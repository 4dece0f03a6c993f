package jaildef

import (
	"bytes"
	"fmt"
	"os"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// schemaStart is how protobuf's C++ code begins the serialized FileDescriptorProto it embeds for nsjail's
// config.proto: field 1 (name) "config.proto", field 2 (package) "nsjail". The schema is taken from the binary
// that will read the configs, so a field this nsjail does not know is an error here too, and nothing of nsjail's
// source is copied into this repository.
var schemaStart = []byte("\n\x0cconfig.proto\x12\x06nsjail")

// fileDescriptorWireTypes are the fields of a FileDescriptorProto (descriptor.proto numbers 1 to 14) with their
// wire types; the embedded descriptor ends where the bytes stop being one of them.
var fileDescriptorWireTypes = map[protowire.Number]protowire.Type{
	1: protowire.BytesType, 2: protowire.BytesType, 3: protowire.BytesType, 4: protowire.BytesType,
	5: protowire.BytesType, 6: protowire.BytesType, 7: protowire.BytesType, 8: protowire.BytesType,
	9: protowire.BytesType, 10: protowire.VarintType, 11: protowire.VarintType, 12: protowire.BytesType,
	13: protowire.BytesType, 14: protowire.VarintType,
}

// readSchema finds nsjail's NsJailConfig message in the nsjail binary at path.
func readSchema(path string) (protoreflect.MessageDescriptor, error) {
	bin, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading nsjail for its config schema: %w", err)
	}
	start := bytes.Index(bin, schemaStart)
	if start < 0 {
		return nil, fmt.Errorf("%s holds no config.proto descriptor: is it nsjail?", path)
	}
	end := start
	for end < len(bin) {
		num, typ, n := protowire.ConsumeField(bin[end:])
		if want, known := fileDescriptorWireTypes[num]; n < 0 || !known || typ != want {
			break
		}
		end += n
	}
	var fdp descriptorpb.FileDescriptorProto
	if err := proto.Unmarshal(bin[start:end], &fdp); err != nil {
		return nil, fmt.Errorf("%s: nsjail's config.proto descriptor: %w", path, err)
	}
	fd, err := protodesc.NewFile(&fdp, protoregistry.GlobalFiles)
	if err != nil {
		return nil, fmt.Errorf("%s: nsjail's config.proto descriptor: %w", path, err)
	}
	md := fd.Messages().ByName("NsJailConfig")
	if md == nil {
		return nil, fmt.Errorf("%s: nsjail's config.proto has no NsJailConfig message", path)
	}
	return md, nil
}
