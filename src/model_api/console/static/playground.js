// The playground: a chat streamed token by token from POST /console/chat (the
// signed-in session plus the page's CSRF token), read as Server-Sent Events.
"use strict";
(function () {
  const form = document.getElementById("chat-form");
  if (!form) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const conversation = document.getElementById("conversation");
  const promptBox = document.getElementById("prompt");
  const send = document.getElementById("send");
  const errorBox = document.getElementById("chat-error");
  const remaining = document.getElementById("quota-remaining");
  let messages = [];

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    conversation.appendChild(div);
    return div;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  // each SSE event is one "data: ..." line followed by a blank line
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6);
        }
      }
    }
  }

  form.addEventListener("submit", async function (e) {
    e.preventDefault();
    const text = promptBox.value.trim();
    if (!text) return;
    errorBox.hidden = true;
    messages.push({ role: "user", content: text });
    bubble("user", text);
    promptBox.value = "";
    send.disabled = true;
    const reply = bubble("assistant", "");
    reply.dataset.state = "waiting";
    const body = { messages: messages, stream: true, max_tokens: Number(document.getElementById("max-tokens").value) || 64 };
    const picker = document.getElementById("model");
    if (picker) body.model = picker.value;
    try {
      const response = await fetch(form.dataset.action || "/console/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify(body),
      });
      const left = response.headers.get("X-RateLimit-Remaining");
      if (left !== null && remaining) remaining.textContent = left;
      if (!response.ok) {
        const problem = await response.json().catch(() => ({}));
        reply.remove();
        messages.pop();
        showError((problem.error && problem.error.message) || ("The request failed (" + response.status + ")."));
        return;
      }
      reply.dataset.state = "streaming";
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); break; }
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) reply.textContent += delta.content;
      }
      messages.push({ role: "assistant", content: reply.textContent });
    } catch (err) {
      showError("The connection failed: " + err.message);
    } finally {
      reply.dataset.state = "done";
      send.disabled = false;
    }
  });

  document.getElementById("reset").addEventListener("click", function () {
    messages = [];
    conversation.textContent = "";
    errorBox.hidden = true;
  });
})();
