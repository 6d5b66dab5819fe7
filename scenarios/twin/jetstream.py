#!/usr/bin/env python3
"""Reads a JetStream stream over the plain NATS protocol (no client library to install).

    jetstream.py count NATS_URL STREAM IDS_FILE   every message: prints a JSON summary (messages,
                                                  distinct Nats-Msg-Ids, order per subject) and
                                                  writes the Msg-Ids to IDS_FILE, one per line
    jetstream.py leader MONITOR_URL STREAM        the node that leads STREAM (from /jsz)

Used by scenarios/s9-nats to check the stream from outside the consumer.
"""
import base64
import json
import socket
import sys
import urllib.request
from urllib.parse import urlsplit


class Connection:
    def __init__(self, url):
        parts = urlsplit(url.split(",")[0])
        self.sock = socket.create_connection((parts.hostname, parts.port or 4222), timeout=10)
        self.buf = b""
        self.line()  # INFO
        self.send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\nPING\r\n')
        while self.line() != b"PONG":
            pass
        self.send(b"SUB _INBOX.s9 1\r\n")

    def send(self, data):
        self.sock.sendall(data)

    def fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("the NATS server closed the connection")
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def take(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def request(self, subject, body):
        self.send(b"PUB %s _INBOX.s9 %d\r\n%s\r\n" % (subject.encode(), len(body), body))

    def reply(self):
        """The next message on the inbox: its body as JSON."""
        while True:
            line = self.line()
            if line == b"PING":
                self.send(b"PONG\r\n")
                continue
            if line.startswith(b"-ERR"):
                raise SystemExit(line.decode())
            words = line.split()
            if words[0] == b"MSG":
                return json.loads(self.take(int(words[-1])))
            if words[0] == b"HMSG":
                raw = self.take(int(words[-1]))
                return json.loads(raw[int(words[-2]):])


def headers(encoded):
    out = {}
    for line in base64.b64decode(encoded).decode().split("\r\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            out[name.strip()] = value.strip()
    return out


def position(text):
    tx, _, id_ = text.partition("/")
    return (int(tx), int(id_))


def count(url, stream, ids_file):
    conn = Connection(url)
    conn.request(f"$JS.API.STREAM.INFO.{stream}", b"")
    info = conn.reply()
    if "error" in info:
        raise SystemExit(f"stream {stream}: {info['error']}")
    state = info["state"]
    first, last = state["first_seq"], state["last_seq"]
    ids, last_at, out_of_order, window = [], {}, 0, 512
    for start in range(first, last + 1, window):
        seqs = range(start, min(start + window, last + 1))
        for seq in seqs:
            conn.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode())
        for _ in seqs:
            answer = conn.reply()
            if "error" in answer:
                if answer["error"].get("err_code") == 10037:
                    continue  # no message: a deleted sequence number
                raise SystemExit(f"reading message {answer}: {answer['error']}")
            message = answer["message"]
            h = headers(message.get("hdrs", ""))
            ids.append(h.get("Nats-Msg-Id", ""))
            at = position(h["Pgevents-Position"])
            subject = message["subject"]
            if subject in last_at and at <= last_at[subject]:
                out_of_order += 1
            last_at[subject] = at
    with open(ids_file, "w") as f:
        f.write("\n".join(ids) + ("\n" if ids else ""))
    print(json.dumps({
        "messages": len(ids),
        "distinct_ids": len(set(ids)),
        "subjects": len(last_at),
        "out_of_order": out_of_order,
        "replicas": info["config"].get("num_replicas"),
    }))


def leader(monitor_url, stream):
    with urllib.request.urlopen(f"{monitor_url}/jsz?accounts=true&streams=true", timeout=5) as r:
        jsz = json.load(r)
    for account in jsz.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] == stream:
                print(detail.get("cluster", {}).get("leader", ""))
                return
    raise SystemExit(f"no stream {stream} in {monitor_url}/jsz")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "count":
        count(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "leader":
        leader(*sys.argv[2:])
    else:
        raise SystemExit(__doc__)
