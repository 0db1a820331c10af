// Command etcd is a thin wrapper around go.etcd.io/etcd/server/v3/etcdmain so that etcd can be
// built with `go build` from the published modules (etcd's own go.mod files use replace
// directives, which `go install ...@version` refuses).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
