#!/usr/bin/env bash
# Start (or stop) a throw-away single-node Apache Cassandra 5.0.x for the tests of ScyllaStore
# (no ScyllaDB binary can be installed from a package registry; Cassandra speaks the same CQL,
# LWT and paging). Used by scripts/test.sh; also handy by hand:
#
#   scripts/cassandra.sh start && export CHAT_TEST_SCYLLA_URI=127.0.0.1:19042
#   cargo test -p chat-store --test scylla_store
#   scripts/cassandra.sh stop
#
# Cassandra is resolved from Maven Central (org.apache.cassandra:cassandra-all + runtime deps)
# with mvn into a cache dir, then org.apache.cassandra.service.CassandraDaemon is run directly
# on the local Java 17 (Cassandra 5.0 supports Java 11 and 17 only).
#
#   cassandra.sh [start]   resolve if needed, wipe data, write config, start, wait for CQL port
#   cassandra.sh stop      stop the node started from $CASS_HOME (by pid file)
#   cassandra.sh status    exit 0 when running
#   cassandra.sh resolve   only download the jars into the cache
#   cassandra.sh java      print the Java 11/17 binary that would be used (exit 1 if none)
#   cassandra.sh kill      SIGKILL the node (crash tests; `CASS_KEEP_DATA=1 cassandra.sh start` restarts it)
#
# Environment (all optional):
#   CASS_VERSION=5.0.9  CASS_HOME=${TMPDIR:-/tmp}/chat-sdk-cassandra  CASS_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/chat-sdk/cassandra
#   CQL_PORT=19042  STORAGE_PORT=17000  CASS_HEAP=1G  CASS_START_TIMEOUT=180
#   CASS_KEEP_DATA=1     keep the data dir of a previous run (default: wiped on every start)
#   CASS_COMMITLOG_SYNC=periodic|batch   periodic (default, 10 s: fast, a crash may lose the last
#                        seconds of acked writes) or batch (fsync before every ack: crash tests)
#   CASS_MLOCK=1         let Cassandra mlockall() the JVM (as root that pins the whole heap in RSS)
#   CASS_EXTRA_JVM_OPTS  extra JVM flags
#   JAVA=<a Java 11 or 17 binary; default: found under /usr/lib/jvm, else `java` if it is 11/17>
#   MVN=mvn
set -euo pipefail

CASS_VERSION=${CASS_VERSION:-5.0.9}
CASS_HOME=${CASS_HOME:-${TMPDIR:-/tmp}/chat-sdk-cassandra}
CASS_CACHE=${CASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-sdk/cassandra}
CQL_PORT=${CQL_PORT:-19042}
STORAGE_PORT=${STORAGE_PORT:-17000}
CASS_HEAP=${CASS_HEAP:-1G}
CASS_START_TIMEOUT=${CASS_START_TIMEOUT:-180}
MVN=${MVN:-mvn}
LIB="$CASS_CACHE/cassandra-$CASS_VERSION/lib"
PIDFILE="$CASS_HOME/cassandra.pid"
LOG="$CASS_HOME/logs/stdout.log"

log() { echo "[cassandra.sh] $*" >&2; }

java_version() { "$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}'; }

# Cassandra 5.0 runs on Java 11 or 17 only; other JDKs (e.g. a newer default `java`) must not
# be used. Prefer $JAVA, then JDKs under /usr/lib/jvm, then `java` on the PATH.
find_java() {
  local c
  for c in ${JAVA:-} /usr/lib/jvm/*17*/bin/java /usr/lib/jvm/*11*/bin/java "$(command -v java 2>/dev/null || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    case "$(java_version "$c")" in 11*|17*) echo "$c"; return 0 ;; esac
  done
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

resolve() {
  [ -f "$LIB/.complete" ] && return 0
  command -v "$MVN" >/dev/null || { log "mvn not found (apt-get install -y maven)"; exit 1; }
  local dir="$CASS_CACHE/cassandra-$CASS_VERSION"
  mkdir -p "$dir"
  cat > "$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.test</groupId><artifactId>cassandra-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId><artifactId>cassandra-all</artifactId>
      <version>$CASS_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  log "resolving org.apache.cassandra:cassandra-all:$CASS_VERSION from Maven Central into $LIB"
  rm -rf "$LIB.tmp"
  local t0=$SECONDS
  "$MVN" -B -q -Dstyle.color=never -f "$dir/pom.xml" -Dmaven.repo.local="$CASS_CACHE/m2" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIB.tmp" \
    -DexcludeClassifiers=osx-x86_64,osx-aarch_64,windows-x86_64,linux-aarch_64,linux-riscv64 \
    > "$dir/mvn.log" 2>&1 || { log "mvn failed:"; tail -40 "$dir/mvn.log" >&2; exit 1; }
  ls "$LIB.tmp"/cassandra-all-"$CASS_VERSION".jar >/dev/null
  rm -rf "$LIB"; mv "$LIB.tmp" "$LIB"; touch "$LIB/.complete"
  log "resolved $(ls "$LIB"/*.jar | wc -l) jars, $(du -sh "$LIB" | cut -f1), in $((SECONDS - t0))s"
}

write_config() {
  local d="$CASS_HOME/data"
  mkdir -p "$CASS_HOME/conf/triggers" "$CASS_HOME/logs" "$d"
  cat > "$CASS_HOME/conf/cassandra.yaml" <<EOF
cluster_name: 'test-cluster'
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories:
  - $d/data
commitlog_directory: $d/commitlog
saved_caches_directory: $d/saved_caches
hints_directory: $d/hints
cdc_raw_directory: $d/cdc_raw
$(if [ "${CASS_COMMITLOG_SYNC:-periodic}" = batch ]; then echo "commitlog_sync: batch"; else printf 'commitlog_sync: periodic\ncommitlog_sync_period: 10000ms'; fi)
commitlog_segment_size: 8MiB
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $STORAGE_PORT
ssl_storage_port: $((STORAGE_PORT + 1))
native_transport_port: $CQL_PORT
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 2
concurrent_compactors: 1
memtable_flush_writers: 1
native_transport_max_threads: 16
EOF
  cat > "$CASS_HOME/conf/logback.xml" <<'EOF'
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>INFO</level></filter>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE" />
    <appender-ref ref="STDOUT" />
  </root>
</configuration>
EOF
}

jvm_opts() {
  # GC + JPMS flags from Cassandra 5.0 conf/jvm17-server.options (+ a few from jvm-server.options)
  local o=(
    -Xms"$CASS_HEAP" -Xmx"$CASS_HEAP" -Xss256k
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
    -XX:+ExitOnOutOfMemoryError -XX:+PerfDisableSharedMem
    -XX:TieredStopAtLevel=1   # C1 only: ~35-45% less CPU to start on a 2-core box; fine for a test node
    -Djava.net.preferIPv4Stack=true -Djava.security.manager=allow
    -Djdk.attach.allowAttachSelf=true
    --add-exports=java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports=java.sql/java.sql=ALL-UNNAMED
    --add-exports=java.base/java.lang.ref=ALL-UNNAMED
    --add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens=java.base/java.lang.module=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens=java.base/java.io=ALL-UNNAMED
    --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens=java.base/java.lang=ALL-UNNAMED
    --add-opens=java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -Dcassandra-foreground=yes
    -Dcassandra.config="file://$CASS_HOME/conf/cassandra.yaml"
    -Dcassandra.storagedir="$CASS_HOME/data"
    -Dcassandra.logdir="$CASS_HOME/logs"
    -Dlogback.configurationFile="file://$CASS_HOME/conf/logback.xml"
    -Dcassandra.triggers_dir="$CASS_HOME/conf/triggers"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
  )
  local jamm; jamm=$(ls "$LIB"/jamm-*.jar 2>/dev/null | head -1 || true)
  [ -n "$jamm" ] && o+=(-javaagent:"$jamm")
  # shellcheck disable=SC2206
  [ -n "${CASS_EXTRA_JVM_OPTS:-}" ] && o+=($CASS_EXTRA_JVM_OPTS)
  printf '%s\n' "${o[@]}"
}

do_start() {
  if pid=$(running_pid); then log "already running (pid $pid)"; exit 1; fi
  local java jv
  java=$(find_java) || { log "no Java 11 or 17 found; Cassandra 5.0 needs one (set JAVA=...)"; exit 1; }
  jv=$(java_version "$java")
  for p in "$CQL_PORT" "$STORAGE_PORT"; do
    if port_open "$p"; then log "port $p on 127.0.0.1 is already in use"; exit 1; fi
  done
  resolve
  [ "${CASS_KEEP_DATA:-0}" = 1 ] || rm -rf "$CASS_HOME/data" "$CASS_HOME/logs"
  write_config
  mapfile -t opts < <(jvm_opts)
  local prefix=()
  # Cassandra always calls mlockall(MCL_CURRENT); as root (CAP_IPC_LOCK) that succeeds and pins the
  # whole pre-committed heap. Drop the capability so it fails harmlessly (a WARN) unless CASS_MLOCK=1.
  if [ "${CASS_MLOCK:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    prefix=(setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock)
  fi
  local t0; t0=$(date +%s.%N)
  # setsid: own process group, so the caller's Ctrl-C / test-runner signals don't hit it
  setsid "${prefix[@]}" "$java" "${opts[@]}" -cp "$CASS_HOME/conf:$LIB/*" \
    org.apache.cassandra.service.CassandraDaemon > "$LOG" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$PIDFILE"
  log "started pid $pid (Cassandra $CASS_VERSION, Java $jv), waiting for CQL on 127.0.0.1:$CQL_PORT"
  local deadline=$((SECONDS + CASS_START_TIMEOUT))
  until grep -q "Starting listening for CQL clients" "$LOG" 2>/dev/null && port_open "$CQL_PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "Cassandra exited during startup; last log lines:"; tail -40 "$LOG" >&2; exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "timeout after ${CASS_START_TIMEOUT}s; last log lines:"; tail -40 "$LOG" >&2
      kill -9 "$pid" 2>/dev/null || true; exit 1
    fi
    sleep 0.5
  done
  local rss; rss=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status 2>/dev/null || echo '?')
  log "CQL ready on 127.0.0.1:$CQL_PORT after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s (pid $pid, RSS ${rss} kB, log $LOG)"
}

do_stop() {
  local pid
  if ! pid=$(running_pid); then log "not running"; rm -f "$PIDFILE"; return 0; fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then log "pid $pid did not stop in 20s, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$PIDFILE"
  log "stopped pid $pid"
}

do_kill() {
  local pid
  if ! pid=$(running_pid); then log "not running"; rm -f "$PIDFILE"; return 0; fi
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$PIDFILE"
  log "killed pid $pid"
}

case "${1:-start}" in
  start) do_start ;;
  stop) do_stop ;;
  status) if pid=$(running_pid); then echo "running pid $pid"; else echo "not running"; exit 1; fi ;;
  resolve) resolve ;;
  java) find_java ;;
  kill) do_kill ;;
  *) echo "usage: $0 [start|stop|kill|status|resolve|java]" >&2; exit 2 ;;
esac
