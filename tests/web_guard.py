"""Installed in the web server's process by tests/test_web.py: every attempt of that process to reach a host that is
not this machine (a connect or a name lookup) is written to a log file and refused, so the test can tell that the
server stayed offline and no attempt ever waits on the network."""

import ipaddress
import socket

LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost"}


def is_local(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def install(log_path):
    """Refuse and log connections and look-ups of hosts other than this machine, from now on in this process."""
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def note(what):
        with open(log_path, "a") as log:
            log.write(what + "\n")

    def outside(sock, address):
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0])

    def connect(self, address):
        if outside(self, address):
            note(f"connect {address!r}")
            raise OSError(f"web_guard: {address!r} is not on this machine")
        return original_connect(self, address)

    def connect_ex(self, address):
        if outside(self, address):
            note(f"connect_ex {address!r}")
            return 111  # ECONNREFUSED
        return original_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not is_local(host):
            note(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"web_guard: {host!r} is not this machine")
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = getaddrinfo


LONG_ANSWER_MARK = "(keep talking)"
GROUNDING_MARK = "(grounding example)"


def install_test_answers(tokens=1000):
    """Two kinds of questions the embedded model cannot give the test, recognised by how they end:
    LONG_ANSWER_MARK: an answer of `tokens` tokens (its end of text suppressed), so that the test has time to press
    Stop (the small model otherwise answers in one or two tokens);
    GROUNDING_MARK: demo.py's example grounding answer for the model's family about examples/shape.png (the
    embedded model is not trained to ground), with the image grid of the real inputs, so the page draws it."""
    import demo
    import web_demo

    stream = web_demo.Engine.stream

    class Long(web_demo.Settings):
        def generate_kwargs(self):
            return {**super().generate_kwargs(), "max_new_tokens": tokens, "min_new_tokens": tokens}

    def test_stream(self, messages, settings=None, stop=None):
        content = messages[-1]["content"] if messages else ""
        last = content[-1].get("text", "") if isinstance(content, list) and content else str(content)
        if last.endswith(GROUNDING_MARK):
            inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
            answer = demo.GROUNDING_EXAMPLES[self.family]
            yield web_demo.Reply(text=answer, raw=answer, done=True, image_grid_thw=inputs.get("image_grid_thw"))
            return
        if last.endswith(LONG_ANSWER_MARK):
            base = settings or web_demo.Settings()
            settings = Long(base.temperature, base.top_p, base.max_new_tokens)
        yield from stream(self, messages, settings, stop)

    web_demo.Engine.stream = test_stream
