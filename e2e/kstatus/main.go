// Command kstatus prints how sigs.k8s.io/cli-utils/pkg/kstatus (the library Flux and kpt read resources'
// health with) sees Lockstep's objects: it reads a JSON array of Kubernetes objects on stdin and prints
// one line per object, "<name>\t<status>\t<message>". operator/tests/observability.rs runs it on the
// statuses a real operator and sidecar wrote.
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	// Numbers become int64 where they are whole, as kstatus expects of generations.
	"k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: reading stdin: %v\n", err)
		os.Exit(2)
	}
	var objects []map[string]interface{}
	if err := json.Unmarshal(input, &objects); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: stdin is not a JSON array of objects: %v\n", err)
		os.Exit(2)
	}
	for _, object := range objects {
		u := &unstructured.Unstructured{Object: object}
		result, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s %s: %v\n", u.GetKind(), u.GetName(), err)
			os.Exit(1)
		}
		fmt.Printf("%s\t%s\t%s\n", u.GetName(), result.Status, result.Message)
	}
}
