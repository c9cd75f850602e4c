// etcd, built from the pinned go.etcd.io/etcd/server/v3 release: the same main as etcd's own binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
