{{/* env + envFrom of the orchestrator containers (Deployment and Ray pods). */}}
{{- define "funchat.orchestratorEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "funchat.fullname" . }}-orchestrator
env:
  {{- include "funchat.redisPasswordEnv" (dict "ctx" . "name" "FUNCHAT_REDIS_PASSWORD") | nindent 2 }}
  - name: FUNCHAT_REDIS_URL
    value: {{ include "funchat.redisUrl" . | quote }}
  {{- if include "funchat.redisCaSecret" . }}
  - name: FUNCHAT_REDIS_CA_FILE
    value: /etc/funchat/redis-tls/ca.crt
  {{- end }}
  - name: FUNCHAT_RESUME_SECRET_FILE
    value: /etc/funchat/resume/{{ .Values.secrets.resume.key }}
  - name: FUNCHAT_AUTH
    value: {{ .Values.auth.mode | quote }}
  {{- if eq .Values.auth.mode "api_keys" }}
  # the key file, re-read when the kubelet updates the Secret (no restart)
  - name: FUNCHAT_API_KEYS_FILE
    value: {{ include "funchat.apiKeysMountPath" . }}/{{ .Values.auth.apiKeysSecret.key }}
  {{- end }}
  {{- if eq .Values.orchestrator.mode "deployment" }}
  # the address `python -m funchat.orchestrator.app` binds Ray Serve's HTTP proxy (FUNCHAT_HTTP_PORT,
  # the Realtime WebSocket) on: all interfaces when exposed (orchestrator.realtime.enabled), else the
  # pod's loopback only. The Ray pods' proxy binds what serveConfigV2's http_options say instead.
  - name: FUNCHAT_HTTP_HOST
    value: {{ ternary "0.0.0.0" "127.0.0.1" .Values.orchestrator.realtime.enabled | quote }}
  {{- end }}
  {{- if eq .Values.orchestrator.mode "rayservice" }}
  # Ray Serve's gRPC proxy limit (2 GiB otherwise), which `python -m funchat.orchestrator.app` sets
  # from FUNCHAT_MAX_MESSAGE_BYTES in mode deployment; the Ray pods have no such process
  - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
    value: {{ include "funchat.maxMessageBytes" . | quote }}
  {{- end }}
  {{- with include "funchat.tracingEnv" . }}
  {{- . | nindent 2 }}
  {{- end }}
  # Ray writes under $HOME (~/.ray: its auth token); the root file system is read-only, /tmp is not
  - name: HOME
    value: /tmp
{{- end -}}

{{- define "funchat.orchestratorMounts" -}}
{{ include "funchat.checkpointMount" . }}
- name: resume-secret
  mountPath: /etc/funchat/resume
  readOnly: true
{{- if include "funchat.redisCaSecret" . }}
- name: redis-ca
  mountPath: /etc/funchat/redis-tls
  readOnly: true
{{- end }}
{{- if eq .Values.auth.mode "api_keys" }}
# the whole Secret as a directory, no subPath: the kubelet's updates (key rotation) reach the file
- name: api-keys
  mountPath: {{ include "funchat.apiKeysMountPath" . }}
  readOnly: true
{{- end }}
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "funchat.orchestratorVolumes" -}}
{{ include "funchat.checkpointVolume" . }}
- name: resume-secret
  secret:
    secretName: {{ include "funchat.resumeSecretName" . }}
    defaultMode: 0400
    # explicit (the default): the pod waits for the key; also spares podman 4.3's kube play a crash
    optional: false
{{- with include "funchat.redisCaSecret" . }}
# the CA alone (no subPath, so a renewed CA reaches the file): Redis' key stays in its own pod
- name: redis-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ include "funchat.redisCaKey" $ }}
        path: ca.crt
    optional: false
{{- end }}
{{- if eq .Values.auth.mode "api_keys" }}
- name: api-keys
  secret:
    # created by the operator (NOTES.txt): the pod waits for it
    secretName: {{ include "funchat.apiKeysSecretName" . }}
    defaultMode: 0400
    optional: false
{{- end }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.orchestrator.shmSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.orchestrator.tmpSizeLimit }}
{{- end -}}

{{/* Pod spec of a Ray head or worker of the RayService; dict "ctx" . "head" bool. */}}
{{- define "funchat.rayPodSpec" -}}
{{- $ctx := .ctx -}}
{{- $o := $ctx.Values.orchestrator -}}
serviceAccountName: {{ include "funchat.fullname" $ctx }}-orchestrator
automountServiceAccountToken: false
securityContext:
  {{- include "funchat.podSecurityContext" $ctx | nindent 2 }}
terminationGracePeriodSeconds: {{ $o.drain.terminationGracePeriodSeconds }}
{{- with $o.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $o.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if eq $ctx.Values.modelStorage.mode "download" }}
initContainers:
  {{- include "funchat.fetchInitContainer" $ctx | nindent 2 }}
{{- end }}
containers:
  # the Ray container first: KubeRay takes containers[0] for Ray
  - name: {{ ternary "ray-head" "ray-worker" .head }}
    image: {{ include "funchat.image" (dict "ctx" $ctx "image" $o.image) }}
    imagePullPolicy: {{ $o.image.pullPolicy }}
    {{- include "funchat.orchestratorEnv" $ctx | nindent 4 }}
    ports:
      {{- if .head }}
      - name: gcs
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      {{- end }}
      # Ray Serve's HTTP proxy (serveConfigV2 http_options: 0.0.0.0:httpPort), the Realtime WebSocket and
      # the web page: the public Service's port http targets it; KubeRay finds it by this name (its
      # readiness probe of the workers, its own <name>-serve-svc)
      - name: serve
        containerPort: {{ $o.httpPort }}
      # Ray Serve's gRPC proxy, behind the gateway sidecar (on all interfaces: Ray binds [::])
      - name: serve-grpc
        containerPort: {{ $o.proxyPort }}
      {{- if $o.metricsPort }}
      # bound by the first Serve replica of the pod (funchat/orchestrator/metrics.py)
      - name: metrics
        containerPort: {{ $o.metricsPort }}
      {{- end }}
    lifecycle:
      preStop:
        sleep:
          seconds: {{ $o.drain.preStopSleepSeconds }}
    resources:
      {{- toYaml $o.rayService.resources | nindent 6 }}
    securityContext:
      {{- include "funchat.containerSecurityContext" $ctx | nindent 6 }}
    volumeMounts:
      {{- include "funchat.orchestratorMounts" $ctx | nindent 6 }}
  {{- include "funchat.gatewayContainer" $ctx | nindent 2 }}
volumes:
  {{- include "funchat.orchestratorVolumes" $ctx | nindent 2 }}
  {{- with include "funchat.gatewayTlsVolumes" $ctx }}
  {{- . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The public API's TLS (values tls.*): env of the container running the gateway. */}}
{{- define "funchat.gatewayTlsEnv" -}}
{{- if .Values.tls.secretName }}
# TLS of the public port; the files are re-read when the kubelet updates the Secret (no restart)
- name: FUNCHAT_TLS_CERT_FILE
  value: /etc/funchat/tls/tls.crt
- name: FUNCHAT_TLS_KEY_FILE
  value: /etc/funchat/tls/tls.key
{{- if .Values.tls.clientCASecret }}
- name: FUNCHAT_TLS_CLIENT_CA_FILE
  value: /etc/funchat/client-ca/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{- define "funchat.gatewayTlsMounts" -}}
{{- if .Values.tls.secretName }}
# whole Secrets as directories, no subPath: a renewed certificate reaches the files
- name: public-tls
  mountPath: /etc/funchat/tls
  readOnly: true
{{- if .Values.tls.clientCASecret }}
- name: client-ca
  mountPath: /etc/funchat/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "funchat.gatewayTlsVolumes" -}}
{{- if .Values.tls.secretName }}
- name: public-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0400
    optional: false
{{- if .Values.tls.clientCASecret }}
- name: client-ca
  secret:
    secretName: {{ .Values.tls.clientCASecret }}
    defaultMode: 0400
    optional: false
{{- end }}
{{- end }}
{{- end -}}

{{/* The gateway sidecar of a Ray pod (mode rayservice): the public port, forwarding to the pod's
Ray Serve gRPC proxy on 127.0.0.1:proxyPort. Ready when the application answers its health check
through Ray's proxy (plaintext: kubelet's gRPC probes cannot speak TLS); alive while it listens. */}}
{{- define "funchat.gatewayContainer" -}}
{{- $o := .Values.orchestrator -}}
- name: gateway
  image: {{ include "funchat.image" (dict "ctx" . "image" $o.image) }}
  imagePullPolicy: {{ $o.image.pullPolicy }}
  command: [python, -m, funchat.gateway]
  envFrom:
    - configMapRef:
        name: {{ include "funchat.fullname" . }}-orchestrator
  {{- with include "funchat.gatewayTlsEnv" . }}
  env:
    {{- . | nindent 4 }}
  {{- end }}
  ports:
    - name: grpc
      containerPort: {{ $o.grpcPort }}
      protocol: TCP
  readinessProbe:
    grpc:
      port: {{ $o.proxyPort }}
      service: ""
    periodSeconds: {{ $o.probes.readinessPeriodSeconds }}
  livenessProbe:
    tcpSocket:
      port: grpc
    periodSeconds: {{ $o.probes.livenessPeriodSeconds }}
    failureThreshold: 6
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $o.drain.preStopSleepSeconds }}
  resources:
    {{- toYaml $o.gateway.resources | nindent 4 }}
  securityContext:
    {{- include "funchat.containerSecurityContext" . | nindent 4 }}
  {{- with include "funchat.gatewayTlsMounts" . }}
  volumeMounts:
    {{- . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The container port of Ray Serve's HTTP proxy: "http" on the Deployment's orchestrator
container, "serve" on the Ray containers (the name KubeRay looks for). */}}
{{- define "funchat.httpPortName" -}}
{{- ternary "serve" "http" (eq .Values.orchestrator.mode "rayservice") -}}
{{- end -}}

{{/* Fails when two of the orchestrator's ports (public gRPC, Ray's gRPC proxy, HTTP, metrics) are one. */}}
{{- define "funchat.checkOrchestratorPorts" -}}
{{- $o := .Values.orchestrator -}}
{{- $ports := dict "grpcPort" $o.grpcPort "proxyPort" $o.proxyPort "httpPort" $o.httpPort -}}
{{- if $o.metricsPort }}{{ $_ := set $ports "metricsPort" $o.metricsPort }}{{ end -}}
{{- $seen := dict -}}
{{- range $key := keys $ports | sortAlpha }}
{{- $port := toString (index $ports $key) }}
{{- if hasKey $seen $port }}
{{- fail (printf "orchestrator.%s and orchestrator.%s are both %s: each orchestrator port needs its own number" (index $seen $port) $key $port) }}
{{- end }}
{{- $_ := set $seen $port $key }}
{{- end }}
{{- end -}}
