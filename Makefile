# rabibridge for Lua. `make` builds; `make run` serves services/ on a local
# broker; `make test` runs the busted suite against a private broker. Each
# target installs the Debian packages it needs (scripts/deps.sh).
VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
BINDIR    ?= $(PREFIX)/bin
MANDIR    ?= $(PREFIX)/share/man
CC        ?= cc
CFLAGS    ?= -O2 -g
LUAJIT_INC ?= /usr/include/luajit-2.1
WARN      := -std=c11 -Wall -Wextra -Werror
CPPFLAGS  += -D_GNU_SOURCE -I$(LUAJIT_INC) -Ihost -DRB_VERSION='"$(VERSION)"'
LIBS      := -lrabbitmq -lzstd -lreadline -lssl -lcrypto -lmsgpackc -lmicrohttpd
# host/toml.cc wraps toml++ (header-only) and is the one C++ file.
CXX       ?= g++
CXXWARN   := -std=c++17 -Wall -Wextra -Werror -fvisibility=hidden -fvisibility-inlines-hidden
CXXLIBS   := -lstdc++
# Where Debian's LuaJIT looks under /usr/local (luajit -e 'print(package.path)').
LUA_LIBDIR   ?= $(PREFIX)/lib/lua/5.1
LUA_SHAREDIR ?= $(PREFIX)/share/lua/5.1

# The Debian packages each target needs, on top of those before it.
BUILD_DEPS := gcc g++ libc6-dev make luajit libluajit-5.1-dev librabbitmq-dev libssl-dev libzstd-dev \
              libmsgpack-dev libreadline-dev libtomlplusplus-dev libmicrohttpd-dev
RUN_DEPS   := rabbitmq-server python3
TEST_DEPS  := lua-busted lua-cjson python3-aio-pika python3-msgpack python3-zstandard python3-cryptography \
              openssl zstd iproute2 procps curl prometheus
FUZZ_DEPS  := clang libclang-rt-14-dev
LINT_DEPS  := cppcheck clang-format
DOC_DEPS   := lua-ldoc
DEB_DEPS   := debhelper dpkg-dev
ROCK_DEPS  := luarocks
# make bench: wrk against the gateway and a FastAPI app (the combined HTTP
# echo); instructions per call (callgrind) and syscalls per call (strace).
BENCH_DEPS := wrk python3-fastapi python3-uvicorn python3-aio-pika python3-msgpack curl valgrind strace
DEPS       := $(BUILD_DEPS) $(RUN_DEPS)

CORE_SRC := host/loop.c host/log.c host/task.c host/bind.c host/sleep.c host/codec.c host/link.c \
            host/client.c host/server.c host/worker.c host/supervisor.c host/lineedit.c host/fs.c \
            host/url.c host/crypto.c host/values.c host/json.c host/msgpack.c host/trace.c host/core.c \
            host/metrics.c host/http.c host/notify.c host/watchdog.c host/heap.c host/deadlines.c
# Ctrl-C for the REPL (apart from the list above, which other work edits too).
CORE_SRC += host/interrupt.c
# rabihost list: the hosts answer for their functions.
CORE_SRC += host/discovery.c
# The HTTP gateway's Lua binding (issue 14).
CORE_SRC += host/gateway.c
# What a message body goes through before a handler sees it: all the fuzzer links.
CODEC_SRC := host/codec.c host/values.c host/json.c host/msgpack.c
LUA_SRC  := $(sort $(wildcard lua/rabibridge/*.lua))
HEADERS  := $(wildcard host/*.h)

CORE_OBJ := $(CORE_SRC:host/%.c=build/obj/%.o) build/obj/toml.o
PIC_OBJ  := $(CORE_SRC:host/%.c=build/pic/%.o) build/pic/toml.o

.PHONY: all deps deps-test deps-fuzz deps-lint deps-doc deps-deb deps-rock deps-bench run test bench install \
        uninstall clean format lint check-memory fuzz soak man doc deb rock cluster cluster-stop

include bench/Makefile.inc

all: build/rabihost build/rabibridge/core.so build/rabihost.1

build/obj/%.o: host/%.c $(HEADERS) | build/obj
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -c $< -o $@

build/pic/%.o: host/%.c $(HEADERS) | build/pic
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -fPIC -c $< -o $@

build/obj/toml.o: host/toml.cc | build/obj
	$(CXX) $(CXXWARN) $(CFLAGS) $(CPPFLAGS) -c $< -o $@

build/pic/toml.o: host/toml.cc | build/pic
	$(CXX) $(CXXWARN) $(CFLAGS) $(CPPFLAGS) -fPIC -c $< -o $@

build/gen/lua_modules.c: host/embed.lua $(LUA_SRC) | build/gen
	luajit host/embed.lua $@ $(LUA_SRC)

build/obj/lua_modules.o: build/gen/lua_modules.c | build/obj
	$(CC) $(CFLAGS) -c $< -o $@

# -Wl,-E: Lua C modules loaded by rabihost (cjson) resolve lua_* here.
build/rabihost: $(CORE_OBJ) build/obj/main.o build/obj/lua_modules.o
	$(CC) $(CFLAGS) $(LDFLAGS) -Wl,-E -o $@ $^ -lluajit-5.1 $(LIBS) $(CXXLIBS) -lm -ldl

build/rabibridge/core.so: $(PIC_OBJ) | build/rabibridge
	$(CC) $(CFLAGS) $(LDFLAGS) -shared -o $@ $^ $(LIBS) $(CXXLIBS)

build/obj build/pic build/gen build/rabibridge:
	mkdir -p $@

# The man page, from the table `rabihost --help` prints.
man: build/rabihost.1
build/rabihost.1: doc/mkman.lua lua/rabibridge/help.lua
	@mkdir -p $(@D)
	luajit doc/mkman.lua $(VERSION) > $@.tmp && mv $@.tmp $@

deps:
	@scripts/deps.sh "make" $(DEPS)
deps-test: deps
	@scripts/deps.sh "make test" $(TEST_DEPS)
deps-fuzz: deps
	@scripts/deps.sh "make fuzz" $(FUZZ_DEPS)
deps-lint:
	@scripts/deps.sh "make lint" $(LINT_DEPS)
deps-doc:
	@scripts/deps.sh "make doc" $(BUILD_DEPS) $(DOC_DEPS)
deps-deb:
	@scripts/deps.sh "make deb" $(BUILD_DEPS) $(DEB_DEPS)
deps-bench: deps
	@scripts/deps.sh "make bench" $(BENCH_DEPS)
deps-rock:
	@scripts/deps.sh "make rock" $(BUILD_DEPS) $(ROCK_DEPS)

run: deps all
	scripts/run.sh

test: deps-test all
	scripts/test.sh

# A private three-node RabbitMQ cluster on loopback (scripts/cluster.sh):
# prints its three AMQP URLs, node 1 first, one a line.
cluster: deps
	scripts/cluster.sh start

cluster-stop:
	scripts/cluster.sh stop

bench: deps-bench all $(BENCH_BIN)
	scripts/bench.sh

soak: deps all $(BENCH_BIN)
	scripts/soak.sh

# The default prefix is on Debian's LuaJIT search path; for any other the
# two lines to add are printed (HINT=no: not, as when luarocks installs).
HINT ?= yes
install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LUA_LIBDIR)/rabibridge $(DESTDIR)$(LUA_SHAREDIR)/rabibridge \
	  $(DESTDIR)$(MANDIR)/man1
	install -m 755 build/rabihost $(DESTDIR)$(BINDIR)/rabihost
	install -m 644 build/rabibridge/core.so $(DESTDIR)$(LUA_LIBDIR)/rabibridge/core.so
	install -m 644 $(LUA_SRC) $(DESTDIR)$(LUA_SHAREDIR)/rabibridge/
	install -m 644 build/rabihost.1 $(DESTDIR)$(MANDIR)/man1/rabihost.1
	@if [ -z "$(DESTDIR)" ] && [ "$(HINT)" = yes ] && \
	  ! { luajit -e 'print(package.path)' | tr ';' '\n' | grep -qxF '$(LUA_SHAREDIR)/?/init.lua' && \
	      luajit -e 'print(package.cpath)' | tr ';' '\n' | grep -qxF '$(LUA_LIBDIR)/?.so'; }; then \
	  echo; \
	  echo "LuaJIT does not look in $(PREFIX) for modules: add these two lines to your shell's profile"; \
	  echo "(~/.profile, ~/.bashrc) so that luajit finds rabibridge:"; \
	  echo; \
	  echo '  export LUA_PATH="$(LUA_SHAREDIR)/?.lua;$(LUA_SHAREDIR)/?/init.lua;;"'; \
	  echo '  export LUA_CPATH="$(LUA_LIBDIR)/?.so;;"'; \
	  echo; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/rabihost $(DESTDIR)$(MANDIR)/man1/rabihost.1 \
	  $(DESTDIR)$(LUA_LIBDIR)/rabibridge/core.so $(LUA_SRC:lua/%=$(DESTDIR)$(LUA_SHAREDIR)/%)
	-rmdir $(DESTDIR)$(LUA_LIBDIR)/rabibridge $(DESTDIR)$(LUA_SHAREDIR)/rabibridge 2>/dev/null

# The HTML API reference of the Lua library (doc/config.ld), into build/doc.
# Any warning of ldoc fails it, and so does a public name it leaves out.
doc: deps-doc all
	@mkdir -p build/doc
	ldoc -c doc/config.ld --fatalwarnings . > build/doc.log 2>&1 || { cat build/doc.log; exit 1; }
	@if grep -v '^output written to\|^reading configuration from\|^changing to directory' build/doc.log | grep -q .; then \
	  cat build/doc.log; echo "make doc: ldoc warned (above)"; exit 1; fi
	luajit doc/check.lua
	@echo "API reference: build/doc/index.html"

# A Debian package, built from a copy of the tree under build/deb (so that
# dpkg-buildpackage writes there, not next to the checkout).
deb: deps-deb
	@v=$$(dpkg-parsechangelog -S Version); [ "$$v" = $(VERSION) ] || \
	  { echo "debian/changelog is at $$v, the Makefile at $(VERSION): add a changelog entry (dch -v)"; exit 1; }
	rm -rf build/deb
	mkdir -p build/deb/rabihost-$(VERSION)
	tar --exclude=./build --exclude=./.git -cf - . | tar -C build/deb/rabihost-$(VERSION) -xf -
	cd build/deb/rabihost-$(VERSION) && \
	  DEB_BUILD_OPTIONS="nocheck noautodbgsym parallel=$$(nproc)" dpkg-buildpackage -b -us -uc
	@ls build/deb/*.deb

# The rock into a tree of its own under build/rocks, as a user runs it: plain
# `luarocks make` (the rockspec finds LuaJIT's headers itself).
ROCK_TREE ?= build/rocks
rock: deps-rock
	luarocks --tree=$(ROCK_TREE) make rabibridge-$(VERSION)-1.rockspec

# libFuzzer on the body decoders (zstd, json, msgpack) under ASan and UBSan.
FUZZ_SECONDS ?= 60
build/fuzz/fuzz_body: fuzz/fuzz_body.c $(CODEC_SRC) $(HEADERS)
	@mkdir -p build/fuzz
	clang -g -O1 -std=c11 -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined $(CPPFLAGS) fuzz/fuzz_body.c $(CODEC_SRC) \
	  -o $@ -lluajit-5.1 -lzstd -lmsgpackc -lm -ldl

fuzz: deps-fuzz build/fuzz/fuzz_body
	@mkdir -p build/fuzz/corpus
	build/fuzz/fuzz_body -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 \
	  -print_final_stats=1 build/fuzz/corpus fuzz/corpus

# The host under AddressSanitizer, LeakSanitizer and UBSan, and the whole
# spec suite run against it; any report fails (build/asan/report.*).
build/asan/toml.o: host/toml.cc
	@mkdir -p build/asan
	$(CXX) -g -O1 $(CXXWARN) -fsanitize=address,undefined -fno-omit-frame-pointer $(CPPFLAGS) -c $< -o $@

build/asan/rabihost: $(CORE_SRC) host/main.c build/gen/lua_modules.c $(HEADERS) build/asan/toml.o
	@mkdir -p build/asan
	$(CC) -g -O1 $(WARN) -fsanitize=address,undefined -fno-omit-frame-pointer $(CPPFLAGS) \
	  $(CORE_SRC) host/main.c build/gen/lua_modules.c build/asan/toml.o -o $@ -Wl,-E -lluajit-5.1 \
	  $(LIBS) $(CXXLIBS) -lm -ldl

check-memory: deps-test all build/asan/rabihost
	rm -f build/asan/report.*
	RABIHOST=build/asan/rabihost \
	ASAN_OPTIONS=detect_leaks=1:log_path=$(CURDIR)/build/asan/report \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/build/asan/report \
	  scripts/test.sh
	@if ls build/asan/report.* >/dev/null 2>&1; then cat build/asan/report.*; \
	  echo "check-memory: sanitizer reports above"; exit 1; fi
	@echo "check-memory: no sanitizer report"

format: deps-lint
	clang-format -i host/*.c host/*.h host/*.cc

lint: deps-lint
	cppcheck --quiet --enable=warning,performance,portability --error-exitcode=1 \
	  -I host --suppress=missingIncludeSystem host/*.c
	clang-format --dry-run --Werror host/*.c host/*.h

clean:
	rm -rf build/obj build/pic build/gen build/rabihost build/rabibridge build/rabihost.1 build/doc build/deb \
	  build/rocks
