// golibvirt-workload drives one libvirt UNIX socket with digitalocean/go-libvirt, a second,
// pure-Go implementation of libvirt's RPC protocol, and prints one JSON object. It exits
// non-zero when any step fails, so a test can run it through a proxy and compare.
//
//	golibvirt-workload -socket PATH -pool-dir DIR [-uri qemu:///system] [-mib 10]
//	golibvirt-workload -socket PATH -across READY_FILE,RESTARTED_FILE
//
// With -across it holds one connection through a proxy restart instead: events registered
// and 8 goroutines pipelining calls on it before, READY_FILE written; once RESTARTED_FILE
// appears, a second more of calls, then a domain defined and undefined whose events must
// arrive on the registration made before.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

type result struct {
	OK             bool     `json:"ok"`
	Errors         []string `json:"errors"`
	URI            string   `json:"uri"`
	LibVersion     uint64   `json:"lib_version"`
	Hostname       string   `json:"hostname"`
	Pools          []string `json:"pools"`
	Networks       []string `json:"networks"`
	DomainDefined  bool     `json:"domain_defined"`
	Events         []string `json:"events"`
	StreamBytes    int      `json:"stream_bytes"`
	UploadSHA256   string   `json:"upload_sha256"`
	DownloadSHA256 string   `json:"download_sha256"`
	StreamMatch    bool     `json:"stream_match"`
	Pipelined      int      `json:"pipelined_ok"`
	PipelinedAfter int      `json:"pipelined_after_restart"`
	ElapsedMs      int64    `json:"elapsed_ms"`
}

func main() {
	sock := flag.String("socket", "/var/run/libvirt/libvirt-sock", "libvirt UNIX socket")
	tcpPort := flag.String("tcp-port", "", "dial 127.0.0.1 on this TCP port instead of -socket")
	uri := flag.String("uri", "qemu:///system", "name sent in CONNECT_OPEN")
	poolDir := flag.String("pool-dir", "", "directory for a transient dir pool (stream test)")
	mib := flag.Int("mib", 10, "MiB uploaded and downloaded back")
	timeout := flag.Duration("timeout", 60*time.Second, "whole-run deadline")
	across := flag.String("across", "", "READY,RESTARTED: hold pipelined calls across a restart")
	flag.Parse()

	res := &result{URI: *uri, Errors: []string{}, Pools: []string{}, Networks: []string{},
		Events: []string{}}
	start := time.Now()
	// A hung proxy must fail the run, not hang the test that called us.
	timer := time.AfterFunc(*timeout, func() {
		res.Errors = append(res.Errors, fmt.Sprintf("deadline of %s exceeded", *timeout))
		finish(res, start)
	})
	if *across != "" {
		files := strings.SplitN(*across, ",", 2)
		if len(files) != 2 {
			res.Errors = append(res.Errors, "-across wants READY,RESTARTED")
		} else {
			holdAcross(res, dial(*sock, *tcpPort), *uri, files[0], files[1])
		}
	} else {
		run(res, *sock, *tcpPort, *uri, *poolDir, *mib)
	}
	timer.Stop()
	finish(res, start)
}

var finishOnce sync.Once

func finish(res *result, start time.Time) {
	finishOnce.Do(func() {
		res.ElapsedMs = time.Since(start).Milliseconds()
		res.OK = len(res.Errors) == 0
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
		if !res.OK {
			os.Exit(1)
		}
		os.Exit(0)
	})
}

// connected opens uri through dialer, runs body on the connection and closes it; each
// failure is recorded in res.
func connected(res *result, dialer socket.Dialer, uri string,
	body func(l *libvirt.Libvirt, fail func(string, error))) {
	fail := func(step string, err error) { res.Errors = append(res.Errors, step+": "+err.Error()) }
	l := libvirt.NewWithDialer(dialer)
	if err := l.ConnectToURI(libvirt.ConnectURI(uri)); err != nil {
		fail("connect", err)
		return
	}
	defer func() {
		if err := l.Disconnect(); err != nil {
			fail("disconnect", err)
		}
	}()
	body(l, fail)
}

func run(res *result, sock, tcpPort, uri, poolDir string, mib int) {
	connected(res, dial(sock, tcpPort), uri, func(l *libvirt.Libvirt, fail func(string, error)) {
		workload(res, l, poolDir, mib, fail)
	})
}

func workload(res *result, l *libvirt.Libvirt, poolDir string, mib int, fail func(string, error)) {
	var err error
	if res.LibVersion, err = l.ConnectGetLibVersion(); err != nil {
		fail("lib version", err)
	}
	if res.Hostname, err = l.ConnectGetHostname(); err != nil {
		fail("hostname", err)
	}
	if pools, _, err := l.ConnectListAllStoragePools(1, 0); err != nil {
		fail("list pools", err)
	} else {
		for _, p := range pools {
			res.Pools = append(res.Pools, p.Name)
		}
	}
	if nets, _, err := l.ConnectListAllNetworks(1, 0); err != nil {
		fail("list networks", err)
	} else {
		for _, n := range nets {
			res.Networks = append(res.Networks, n.Name)
		}
	}

	domainEvents(res, l, fail)
	if poolDir != "" {
		volumeStream(res, l, poolDir, mib, fail)
	}
	pipelined(res, l, fail)
}

func dial(sock, tcpPort string) socket.Dialer {
	if tcpPort != "" {
		return dialers.NewRemote("127.0.0.1", dialers.UsePort(tcpPort),
			dialers.WithRemoteTimeout(10*time.Second))
	}
	return dialers.NewLocal(dialers.WithSocket(sock), dialers.WithLocalTimeout(10*time.Second))
}

// holdAcross keeps one connection busy with pipelined calls across a proxy restart (see the
// package comment).
func holdAcross(res *result, dialer socket.Dialer, uri, ready, restarted string) {
	connected(res, dialer, uri, func(l *libvirt.Libvirt, fail func(string, error)) {
		pipelineAcross(res, l, ready, restarted, fail)
	})
}

func pipelineAcross(res *result, l *libvirt.Libvirt, ready, restarted string,
	fail func(string, error)) {
	var err error
	if res.LibVersion, err = l.ConnectGetLibVersion(); err != nil {
		fail("lib version", err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := l.LifecycleEvents(ctx)
	if err != nil {
		fail("lifecycle events", err)
		return
	}
	var mu sync.Mutex
	var stop, after bool
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for {
				mu.Lock()
				done, counted := stop, after
				mu.Unlock()
				if done {
					return
				}
				v, err := l.ConnectGetLibVersion()
				if err == nil && v != res.LibVersion {
					err = fmt.Errorf("version %d, earlier %d", v, res.LibVersion)
				}
				mu.Lock()
				if err != nil {
					fail(fmt.Sprintf("pipelined call on goroutine %d", i), err)
					stop = true
				} else if counted {
					res.PipelinedAfter++
				} else {
					res.Pipelined++
				}
				mu.Unlock()
			}
		}(i)
	}
	if err := os.WriteFile(ready, []byte("ready\n"), 0o644); err != nil {
		fail("ready file", err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(restarted); err == nil {
			break
		}
		if time.Now().After(deadline) {
			fail("restart", fmt.Errorf("no %s within 60 s", restarted))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	after = true
	mu.Unlock()
	time.Sleep(time.Second)
	mu.Lock()
	stop = true
	mu.Unlock()
	wg.Wait()
	if len(res.Errors) == 0 {
		domainEventsOn(res, l, events, fail)
	}
}

// domainEvents defines and undefines an inactive domain with a lifecycle callback registered:
// go-libvirt routes only domain events, so this is the event it can see.
func domainEvents(res *result, l *libvirt.Libvirt, fail func(string, error)) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := l.LifecycleEvents(ctx)
	if err != nil {
		fail("lifecycle events", err)
		return
	}
	domainEventsOn(res, l, events, fail)
}

// domainEventsOn defines and undefines a domain and waits for both events on `events`.
func domainEventsOn(res *result, l *libvirt.Libvirt, events <-chan libvirt.DomainEventLifecycleMsg,
	fail func(string, error)) {
	name := fmt.Sprintf("golibvirt-%d", os.Getpid())
	xml := "<domain type='qemu'><name>" + name + "</name><memory unit='MiB'>32</memory>" +
		"<os><type arch='x86_64'>hvm</type></os></domain>"
	dom, err := l.DomainDefineXML(xml)
	if err != nil {
		fail("define domain", err)
		return
	}
	res.DomainDefined = true
	if err := l.DomainUndefine(dom); err != nil {
		fail("undefine domain", err)
	}
	want := map[int32]string{int32(libvirt.DomainEventDefined): "defined",
		int32(libvirt.DomainEventUndefined): "undefined"}
	deadline := time.After(10 * time.Second)
	for len(res.Events) < 2 {
		select {
		case ev, ok := <-events:
			if !ok {
				fail("lifecycle events", fmt.Errorf("event channel closed"))
				return
			}
			if ev.Dom.Name != name {
				continue
			}
			if s, ok := want[ev.Event]; ok {
				res.Events = append(res.Events, s)
			}
		case <-deadline:
			fail("lifecycle events", fmt.Errorf("got %v of defined+undefined in 10 s", res.Events))
			return
		}
	}
}

// volumeStream uploads random bytes into a fresh volume of a transient dir pool and
// downloads them back; go-libvirt sends stream data in frames of just under 4 MiB.
func volumeStream(res *result, l *libvirt.Libvirt, dir string, mib int, fail func(string, error)) {
	name := fmt.Sprintf("golibvirt-%d", os.Getpid())
	poolXML := "<pool type='dir'><name>" + name + "</name><target><path>" + dir +
		"</path></target></pool>"
	pool, err := l.StoragePoolCreateXML(poolXML, 0)
	if err != nil {
		fail("create pool", err)
		return
	}
	defer func() {
		if err := l.StoragePoolDestroy(pool); err != nil {
			fail("destroy pool", err)
		}
	}()
	size := mib << 20
	volXML := fmt.Sprintf("<volume><name>%s.img</name><capacity unit='bytes'>%d</capacity>"+
		"<target><format type='raw'/></target></volume>", name, size)
	vol, err := l.StorageVolCreateXML(pool, volXML, 0)
	if err != nil {
		fail("create volume", err)
		return
	}
	defer func() {
		if err := l.StorageVolDelete(vol, 0); err != nil {
			fail("delete volume", err)
		}
	}()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		fail("random", err)
		return
	}
	up := sha256.Sum256(data)
	res.UploadSHA256 = hex.EncodeToString(up[:])
	if err := l.StorageVolUpload(vol, bytes.NewReader(data), 0, uint64(size), 0); err != nil {
		fail("upload", err)
		return
	}
	var back bytes.Buffer
	if err := l.StorageVolDownload(vol, &back, 0, uint64(size), 0); err != nil {
		fail("download", err)
		return
	}
	down := sha256.Sum256(back.Bytes())
	res.DownloadSHA256 = hex.EncodeToString(down[:])
	res.StreamBytes = back.Len()
	res.StreamMatch = back.Len() == size && up == down
	if !res.StreamMatch {
		fail("stream", fmt.Errorf("downloaded %d bytes, sha256 %s, uploaded %d bytes, sha256 %s",
			back.Len(), res.DownloadSHA256, size, res.UploadSHA256))
	}
}

// pipelined issues 8 calls at once on the one connection: go-libvirt writes each as soon as
// it is made and matches replies by serial, so they are in flight together.
func pipelined(res *result, l *libvirt.Libvirt, fail func(string, error)) {
	const n = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			var err error
			if i%2 == 0 {
				var v uint64
				v, err = l.ConnectGetLibVersion()
				if err == nil && v != res.LibVersion {
					err = fmt.Errorf("version %d, earlier %d", v, res.LibVersion)
				}
			} else {
				var h string
				h, err = l.ConnectGetHostname()
				if err == nil && h != res.Hostname {
					err = fmt.Errorf("hostname %q, earlier %q", h, res.Hostname)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				fail(fmt.Sprintf("pipelined call %d", i), err)
			} else {
				res.Pipelined++
			}
		}(i)
	}
	close(start)
	wg.Wait()
}
