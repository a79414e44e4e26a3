# rabibridge for Lua. `make` builds; `make run` serves services/ on a local
# broker; `make test` runs the busted suite against a private broker.
VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
CC        ?= cc
CFLAGS    ?= -O2 -g
LUAJIT_INC ?= /usr/include/luajit-2.1
WARN      := -std=c11 -Wall -Wextra -Werror
CPPFLAGS  += -D_GNU_SOURCE -I$(LUAJIT_INC) -Ihost -DRB_VERSION='"$(VERSION)"'
LIBS      := -lrabbitmq -lzstd -lreadline -lssl -lcrypto -lmsgpackc
LUA_LIBDIR   := $(PREFIX)/lib/lua/5.1
LUA_SHAREDIR := $(PREFIX)/share/lua/5.1

# Debian packages the build, the broker and the tests need.
DEPS := gcc make librabbitmq-dev libluajit-5.1-dev luajit lua-cjson lua-busted \
        rabbitmq-server libssl-dev libzstd-dev libmsgpack-dev libreadline-dev clang libclang-rt-14-dev \
        python3 python3-aio-pika python3-msgpack python3-zstandard

CORE_SRC := host/loop.c host/task.c host/sleep.c host/codec.c host/link.c \
            host/client.c host/server.c host/process.c host/crypto.c host/values.c host/json.c host/msgpack.c host/core.c
LUA_SRC  := $(sort $(wildcard lua/rabibridge/*.lua))
HEADERS  := $(wildcard host/*.h)

CORE_OBJ := $(CORE_SRC:host/%.c=build/obj/%.o)
PIC_OBJ  := $(CORE_SRC:host/%.c=build/pic/%.o)

.PHONY: all deps run test bench install clean format lint check-memory fuzz soak

include bench/Makefile.inc

all: build/rabihost build/rabibridge/core.so

build/obj/%.o: host/%.c $(HEADERS) | build/obj
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -c $< -o $@

build/pic/%.o: host/%.c $(HEADERS) | build/pic
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -fPIC -c $< -o $@

build/gen/lua_modules.c: host/embed.lua $(LUA_SRC) | build/gen
	luajit host/embed.lua $@ $(LUA_SRC)

build/obj/lua_modules.o: build/gen/lua_modules.c | build/obj
	$(CC) $(CFLAGS) -c $< -o $@

# -Wl,-E: Lua C modules loaded by rabihost (cjson) resolve lua_* here.
build/rabihost: $(CORE_OBJ) build/obj/main.o build/obj/lua_modules.o
	$(CC) $(CFLAGS) -Wl,-E -o $@ $^ -lluajit-5.1 $(LIBS) -lm -ldl

build/rabibridge/core.so: $(PIC_OBJ) | build/rabibridge
	$(CC) $(CFLAGS) -shared -o $@ $^ $(LIBS)

build/obj build/pic build/gen build/rabibridge:
	mkdir -p $@

deps:
	@missing=$$(for p in $(DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: deps all
	scripts/run.sh

test: deps all
	scripts/test.sh

bench: deps all $(BENCH_BIN)
	scripts/bench.sh

soak: deps all $(BENCH_BIN)
	scripts/soak.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(LUA_LIBDIR)/rabibridge $(DESTDIR)$(LUA_SHAREDIR)/rabibridge
	install -m 755 build/rabihost $(DESTDIR)$(PREFIX)/bin/rabihost
	install -m 644 build/rabibridge/core.so $(DESTDIR)$(LUA_LIBDIR)/rabibridge/core.so
	install -m 644 $(LUA_SRC) $(DESTDIR)$(LUA_SHAREDIR)/rabibridge/

# libFuzzer on the body decoders (zstd, json, msgpack) under ASan and UBSan.
FUZZ_SECONDS ?= 60
build/fuzz/fuzz_body: fuzz/fuzz_body.c $(CORE_SRC) $(HEADERS)
	@mkdir -p build/fuzz
	clang -g -O1 -std=c11 -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined $(CPPFLAGS) fuzz/fuzz_body.c $(CORE_SRC) \
	  -o $@ -lluajit-5.1 $(LIBS) -lm -ldl

fuzz: build/fuzz/fuzz_body
	@mkdir -p build/fuzz/corpus
	build/fuzz/fuzz_body -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 \
	  -print_final_stats=1 build/fuzz/corpus fuzz/corpus

# The host under AddressSanitizer, LeakSanitizer and UBSan, and the whole
# spec suite run against it; any report fails (build/asan/report.*).
build/asan/rabihost: $(CORE_SRC) host/main.c build/gen/lua_modules.c $(HEADERS)
	@mkdir -p build/asan
	$(CC) -g -O1 $(WARN) -fsanitize=address,undefined -fno-omit-frame-pointer $(CPPFLAGS) \
	  $(CORE_SRC) host/main.c build/gen/lua_modules.c -o $@ -Wl,-E -lluajit-5.1 $(LIBS) -lm -ldl

check-memory: deps all build/asan/rabihost
	rm -f build/asan/report.*
	RABIHOST=build/asan/rabihost \
	ASAN_OPTIONS=detect_leaks=1:log_path=$(CURDIR)/build/asan/report \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/build/asan/report \
	  scripts/test.sh
	@if ls build/asan/report.* >/dev/null 2>&1; then cat build/asan/report.*; \
	  echo "check-memory: sanitizer reports above"; exit 1; fi
	@echo "check-memory: no sanitizer report"

format:
	clang-format -i host/*.c host/*.h

lint:
	cppcheck --quiet --enable=warning,performance,portability --error-exitcode=1 \
	  -I host --suppress=missingIncludeSystem host/*.c

clean:
	rm -rf build/obj build/pic build/gen build/rabihost build/rabibridge
